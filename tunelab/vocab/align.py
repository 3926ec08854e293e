"""`tunelab vocab align`: teach the rows `tunelab vocab extend` added what the base model already reads in bytes.

A new token is, by construction, a run of old tokens joined (the base's merges run first and the new ones only join
what they leave), so a text in new tokens and the same text in old tokens have token boundaries in common: every
new token ends where some old token ends. At each such boundary the model has read the same bytes, and it should be
in the same state. Self-distillation of the embeddings: the model reading the old tokens is the teacher (its old
rows and every other weight are frozen, so this is the base model exactly), the same model reading the new tokens is
the student, and only the new embedding rows train, to make the student's hidden states at the common boundaries
equal the teacher's, at every layer:

    loss = mean over layers l, common boundaries b and channels of  (u(h_l^new(b)) - u(h_l^old(b)))^2,  u(h) = h / rms(h)

(each state over its root mean square, what the next layer's RMSNorm reads, so that every boundary weighs the same:
a few positions of a residual stream are hundreds of times larger than the rest). Unlike
next-token training on unlabelled text, which asks a few thousand reviews to rebuild what the base learnt to read
from its pre-training, this hands the base's own reading of the language to the new rows.

Reported on held-out texts before and after: the alignment loss and bits per byte of the text, predicted by the base
on the old tokens (the reference) and by the model on the new tokens. Hand-written (a plain loop, one objective, no
packing or checkpoints): no library trains embeddings against a model's own tokenization.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from tunelab.errors import ConfigError, DataError, ModelError
from tunelab.vocab.config import AlignConfig
from tunelab.vocab.extend import CHUNK, byte_of_symbol, check_out, new_directory, read_texts
from tunelab.vocab.results import VOCAB_FILE

Progress = Callable[[str, int], Callable[[int], None]]


@dataclass
class AlignReport:
    model: str
    texts: int
    eval_texts: int
    steps: int
    boundaries: int                  # common boundaries trained on (all steps)
    new_rows: int
    loss_before: float               # held-out alignment loss
    loss_after: float
    bits_per_byte_base: float        # held-out texts: the base on old tokens (what the new rows are taught)
    bits_per_byte_before: float      # the model on new tokens, before
    bits_per_byte_after: float       # ... and after
    tokens_per_text_old: float
    tokens_per_text_new: float
    seconds: float
    settings: dict[str, Any]


def old_tokenizer(new_json: dict[str, Any], first_new: int, added: int):
    """The base's tokenizer rebuilt from the extended one: the vocabulary below ``first_new`` and the merges before
    the ``added`` new ones (extend appends them last)."""
    from tokenizers import Tokenizer

    data = json.loads(json.dumps(new_json))
    model = data["model"]
    vocab = model["vocab"]
    dropped = model["merges"][len(model["merges"]) - added:] if added else []
    for m in dropped:
        a, b = tuple(m) if isinstance(m, list) else m.split(" ", 1)
        if vocab.get(a + b, -1) < first_new:
            raise ModelError("the tokenizer's last merges are not the ones `tunelab vocab extend` added; align needs "
                             "a model written by `tunelab vocab extend`")
    model["merges"] = model["merges"][:len(model["merges"]) - added]
    model["vocab"] = {t: i for t, i in vocab.items() if i < first_new}
    return Tokenizer.from_str(json.dumps(data))


def byte_lengths(new_json: dict[str, Any], size: int) -> list[int]:
    """Bytes each id stands for (byte-level BPE: one symbol per byte); 0 for ids that are not in the BPE vocabulary."""
    table = byte_of_symbol()
    out = [0] * size
    for t, i in new_json["model"]["vocab"].items():
        if i < size and all(c in table for c in t):
            out[i] = len(t)
    return out


def common_boundaries(new_ids: list[int], old_ids: list[int], nbytes: list[int]) -> list[tuple[int, int]] | None:
    """(i, j) for every new position i whose token ends where the old token j ends; None if the two do not spell
    the same number of bytes (a token the table does not know)."""
    ends: dict[int, int] = {}
    pos = 0
    for j, t in enumerate(old_ids):
        if not nbytes[t]:
            return None
        pos += nbytes[t]
        ends[pos] = j
    total, pos, pairs = pos, 0, []
    for i, t in enumerate(new_ids):
        if not nbytes[t]:
            return None
        pos += nbytes[t]
        if pos in ends:
            pairs.append((i, ends[pos]))
    return pairs if pos == total else None


@dataclass
class Pair:
    new: list[int]
    old: list[int]
    bounds: list[tuple[int, int]]
    nbytes: int


def make_pairs(texts: list[str], new_tok, old_tok, nbytes: list[int], max_tokens: int, prefix: int) -> list[Pair]:
    """Each text in new and in old tokens, both after the same ``prefix`` token (so every byte of the text is
    predicted, and the first tokens have a context), with their common boundaries."""
    pairs = []
    for s in range(0, len(texts), CHUNK):
        chunk = texts[s:s + CHUNK]
        for a, b in zip(new_tok.encode_batch(chunk, add_special_tokens=False),
                        old_tok.encode_batch(chunk, add_special_tokens=False)):
            new, old = list(a.ids), list(b.ids)
            bounds = common_boundaries(new, old, nbytes)
            if not bounds:
                continue
            if len(old) > max_tokens:  # cut both at the last common boundary within the old budget
                keep = [(i, j) for i, j in bounds if j < max_tokens]
                if not keep:
                    continue
                bounds = keep
                new, old = new[:keep[-1][0] + 1], old[:keep[-1][1] + 1]
            pairs.append(Pair([prefix, *new], [prefix, *old], [(i + 1, j + 1) for i, j in bounds],
                              sum(nbytes[t] for t in new)))
    return pairs


def _pad(seqs: list[list[int]], pad: int, device):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for k, s in enumerate(seqs):
        ids[k, :len(s)] = torch.tensor(s)
        mask[k, :len(s)] = 1
    return ids.to(device), mask.to(device)


def _index(batch: list[Pair], device):
    import torch

    rows = [k for k, p in enumerate(batch) for _ in p.bounds]
    return (torch.tensor(rows, device=device), torch.tensor([i for p in batch for i, _ in p.bounds], device=device),
            torch.tensor([j for p in batch for _, j in p.bounds], device=device))


def _unit(h):
    """Each position's hidden state over its root mean square (what the next layer's RMSNorm reads), so that every
    boundary weighs the same whatever the size of its activations (some positions of a residual stream are
    hundreds of times larger than the rest)."""
    return h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


class Aligner:
    """The frozen model with its new embedding rows as the one trainable tensor."""

    def __init__(self, model, first_new: int, device, autocast):
        import torch

        self.model, self.first_new, self.device, self.autocast = model, first_new, device, autocast
        emb = model.get_input_embeddings().weight
        self.old_rows = emb.detach()[:first_new]
        self.new_rows = torch.nn.Parameter(emb.detach()[first_new:].clone().float())
        for p in model.parameters():
            p.requires_grad_(False)

    def embed(self, ids, student: bool):
        import torch

        old = self.old_rows[ids.clamp(max=self.first_new - 1)]
        if not student:
            return old
        new = self.new_rows.to(old.dtype)[(ids - self.first_new).clamp(min=0)]
        return torch.where((ids >= self.first_new).unsqueeze(-1), new, old)

    def hidden(self, seqs: list[list[int]], student: bool):
        """The decoder's hidden states after each layer (the last with the final norm), (B, T, C) each."""
        from tunelab.models.scoring import autocast_context

        ids, mask = _pad(seqs, 0, self.device)
        with autocast_context(self.device.type, self.autocast):
            out = self.model.get_decoder()(inputs_embeds=self.embed(ids, student), attention_mask=mask,
                                           output_hidden_states=True, use_cache=False)
        return out.hidden_states[1:]

    def logits(self, seqs: list[list[int]], student: bool):
        from tunelab.models.masks import softcap_logits
        from tunelab.models.scoring import autocast_context

        last = self.hidden(seqs, student)[-1]
        with autocast_context(self.device.type, self.autocast):
            return softcap_logits(self.model.config, self.model.get_output_embeddings()(last).float())

    def loss(self, batch: list[Pair]):
        """Alignment loss of a batch."""
        import torch

        rows, i, j = _index(batch, self.device)
        with torch.no_grad():
            teacher = [_unit(h[rows, j].float()) for h in self.hidden([p.old for p in batch], False)]
        student = self.hidden([p.new for p in batch], True)
        terms = [((_unit(s[rows, i].float()) - t) ** 2).mean() for s, t in zip(student, teacher)]
        return torch.stack(terms).mean()

    def write_back(self) -> None:
        import torch

        with torch.no_grad():
            self.model.get_input_embeddings().weight[self.first_new:] = self.new_rows.to(self.old_rows.dtype)


def bits_per_byte(al: Aligner, pairs: list[Pair], student: bool, batch_size: int) -> float:
    """Bits per byte of the texts: the next-token NLL of every token after the prefix, over the text's bytes."""
    import torch
    import torch.nn.functional as F

    nll, nb = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            batch = pairs[s:s + batch_size]
            seqs = [p.new if student else p.old for p in batch]
            logits = al.logits(seqs, student)
            for k, (p, q) in enumerate(zip(batch, seqs)):  # every q is the prefix and at least one token
                tgt = torch.tensor(q[1:], device=al.device)
                nll += float(F.cross_entropy(logits[k, :len(q) - 1], tgt, reduction="sum"))
                nb += p.nbytes
    return nll / max(1, nb) / math.log(2)


def align_vocab(model_dir: Path, data_path: Path, out: Path, cfg: AlignConfig, *,
                log: Callable[[str], None] = lambda m: None, progress: Progress | None = None,
                threads: int | None = None) -> AlignReport:
    """Train the new rows of ``model_dir`` (written by `tunelab vocab extend`) on ``data_path`` and write the model
    to ``out`` (a new directory; nothing is written when anything is refused)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models.scoring import pick_autocast

    start = time.monotonic()
    make = progress or (lambda desc, total: (lambda n: None))
    model_dir, out = Path(model_dir), Path(out)
    meta_path = model_dir / VOCAB_FILE
    if not meta_path.is_file():
        raise ConfigError(f"{model_dir} has no {VOCAB_FILE}: give a model written by `tunelab vocab extend` (or a "
                          "stage that started from one)", where="--model")
    check_out(out)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    first_new, added = int(meta["first_new_id"]), int(meta["added"])
    texts = read_texts(Path(data_path), cfg.field, limit=cfg.limit, encoding=cfg.encoding)
    if len(texts) <= cfg.eval_texts:
        raise DataError(f"{data_path}: {len(texts)} texts, but {cfg.eval_texts} are held out to measure the "
                        f"alignment: give more texts or a smaller --eval-texts")
    if threads:
        torch.set_num_threads(threads)
    from tokenizers import Tokenizer

    new_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    new_tok = Tokenizer.from_str(json.dumps(new_json))
    old_tok = old_tokenizer(new_json, first_new, added)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model from {model_dir}: {str(e).splitlines()[0]}") from None
    model.eval()
    nbytes = byte_lengths(new_json, model.get_input_embeddings().weight.shape[0])
    held, train = texts[-cfg.eval_texts:], texts[:-cfg.eval_texts]
    random.Random(cfg.seed).shuffle(train)
    log(f"align: {len(train)} texts to train on, {len(held)} held out; tokenizing both ways")
    prefix = model.config.bos_token_id if model.config.bos_token_id is not None else model.config.eos_token_id
    prefix = int(prefix[0] if isinstance(prefix, list) else prefix or 0)
    train_pairs = make_pairs(train, new_tok, old_tok, nbytes, cfg.max_tokens, prefix)
    held_pairs = make_pairs(held, new_tok, old_tok, nbytes, cfg.max_tokens, prefix)
    if not train_pairs:
        raise DataError(f"{data_path}: no text has a token boundary in common between the two tokenizations")
    device = torch.device("cpu")
    autocast = pick_autocast(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    al = Aligner(model, first_new, device, autocast)
    bs = cfg.batch_size

    def held_loss() -> float:
        with torch.no_grad():
            return sum(float(al.loss(held_pairs[s:s + bs])) * len(held_pairs[s:s + bs])
                       for s in range(0, len(held_pairs), bs)) / max(1, len(held_pairs))

    bpb_base = bits_per_byte(al, held_pairs, False, bs)
    bpb_before = bits_per_byte(al, held_pairs, True, bs)
    loss_before = held_loss()
    log(f"align: held out before: loss {loss_before:.4f}, bits/byte {bpb_before:.3f} on new tokens "
        f"(the base on old tokens: {bpb_base:.3f})")
    steps_per_epoch = math.ceil(len(train_pairs) / bs)
    total = max(1, round(steps_per_epoch * cfg.epochs))
    opt = torch.optim.AdamW([al.new_rows], lr=cfg.lr, weight_decay=0.0)
    # linear warm-up, then cosine to 0 (torch's schedulers; transformers' would import bitsandbytes, which warns)
    warm = max(1, math.ceil(total * cfg.warmup_ratio))
    schedule = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warm, total_iters=warm),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warm))], milestones=[warm])
    tick = make("aligning the new rows", total)
    boundaries = 0
    order = list(range(len(train_pairs)))
    rng = random.Random(cfg.seed + 1)
    for step in range(total):
        e, k = divmod(step, steps_per_epoch)
        if k == 0 and e > 0:
            rng.shuffle(order)
        batch = [train_pairs[x] for x in order[k * bs:(k + 1) * bs]]
        loss = al.loss(batch)
        loss.backward()
        if cfg.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_([al.new_rows], cfg.clip_grad_norm)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        boundaries += sum(len(p.bounds) for p in batch)
        if step % 20 == 0 or step == total - 1:
            log(f"align: step {step + 1}/{total} loss {float(loss.detach()):.4f}")
        tick(1)
    al.write_back()
    loss_after = held_loss()
    bpb_after = bits_per_byte(al, held_pairs, True, bs)
    log(f"align: held out after: loss {loss_before:.4f} -> {loss_after:.4f}, bits/byte on new tokens "
        f"{bpb_before:.3f} -> {bpb_after:.3f} (the base on old tokens: {bpb_base:.3f})")
    report = AlignReport(
        model=str(model_dir), texts=len(train_pairs), eval_texts=len(held_pairs), steps=total,
        boundaries=boundaries, new_rows=added, loss_before=round(loss_before, 5), loss_after=round(loss_after, 5),
        bits_per_byte_base=round(bpb_base, 4), bits_per_byte_before=round(bpb_before, 4),
        bits_per_byte_after=round(bpb_after, 4),
        tokens_per_text_old=round(sum(len(p.old) for p in train_pairs) / len(train_pairs), 2),
        tokens_per_text_new=round(sum(len(p.new) for p in train_pairs) / len(train_pairs), 2),
        seconds=0.0, settings={**cfg.model_dump(mode="json"), "data": str(data_path)})
    with new_directory(out) as tmp:
        for f in model_dir.iterdir():  # tokenizer, chat template, generation config, tunelab_vocab.json ...
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
        model.save_pretrained(str(tmp), safe_serialization=True)
        report.seconds = round(time.monotonic() - start, 1)
        meta["align"] = asdict(report)
        (tmp / VOCAB_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report
