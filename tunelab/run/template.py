"""The Jinja2 template of the `tunelab run` report (kept in a module so it ships with the package code).

One page, inline CSS and SVG, no scripts and no external references; every value is autoescaped."""

TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tunelab run: {{ s.name }}</title>
<style>
  :root { --fg: #1d2330; --muted: #5d6675; --line: #dde1e7; --bg: #f6f7f9; --accent: #2f6fb3;
          --good: #1d7a3e; --bad: #b3261e; }
  * { box-sizing: border-box; }
  body { margin: 0; background: var(--bg); color: var(--fg);
         font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "Noto Sans KR", "Apple SD Gothic Neo",
               "Malgun Gothic", sans-serif; }
  main { max-width: 1200px; margin: 0 auto; padding: 24px 20px 60px; }
  h1 { font-size: 26px; margin: 0 0 4px; }
  h2 { font-size: 19px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
  .meta { color: var(--muted); font-size: 13px; }
  .card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 18px; margin: 12px 0; }
  .headline { border-left: 5px solid var(--accent); }
  .headline.win { border-left-color: var(--good); }
  .headline.lose { border-left-color: var(--bad); }
  .headline .big { font-size: 18px; font-weight: 600; }
  .headline ul { margin: 8px 0 0; padding-left: 20px; }
  table { border-collapse: collapse; width: 100%; font-size: 13.5px; background: #fff; }
  th, td { padding: 6px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
  th { background: #eef1f5; font-weight: 600; white-space: nowrap; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  tr.best td { background: #eef6ee; }
  tr.total td { font-weight: 600; background: #f3f5f8; }
  .good { color: var(--good); font-weight: 600; white-space: nowrap; }
  .bad { color: var(--bad); font-weight: 600; white-space: nowrap; }
  .ns { color: var(--muted); white-space: nowrap; }
  .chart svg { max-width: 100%; height: auto; display: block; }
  pre { white-space: pre-wrap; word-break: break-word; margin: 0; background: #f3f4f6; padding: 6px 8px;
        border-radius: 6px; font: 12.5px/1.45 ui-monospace, "SFMono-Regular", Menlo, Consolas, "D2Coding", monospace; }
  .ok { color: var(--good); font-weight: 600; }
  .no { color: var(--bad); font-weight: 600; }
  td.pred-ok { background: #eef6ee; }
  td.pred-no { background: #fbeeee; }
  .small { font-size: 12.5px; color: var(--muted); }
  code { font: 12.5px ui-monospace, Menlo, Consolas, monospace; background: #eef1f5; padding: 1px 4px; border-radius: 4px; }
</style>
</head>
<body>
<main>
<h1>tunelab run: {{ s.name }}</h1>
<div class="meta">
  model <b>{{ s.model }}</b>
  {% if s.dataset %} &middot; eval set <b>{{ s.dataset.name }}</b>, {{ s.dataset.n_items }} items, task {{ s.dataset.task }}
  {% if s.dataset.labels %} ({{ s.dataset.labels | join(", ") }}){% endif %}{% endif %}
  {% if s.limit %} &middot; <b>smoke run: --limit {{ s.limit }}</b>{% endif %}
  &middot; {{ s.created }}
</div>
{% if s.description %}<p>{{ s.description }}</p>{% endif %}

{% set v = s.verdict %}
<section class="card headline {{ 'win' if v.tuning_wins else ('lose' if v.tuning_loses else '') }}" id="verdict">
  <div class="big">{{ v.text }}</div>
  <ul>
    {% for m in s.methods if m.sentence %}<li>{{ m.sentence }}</li>{% endfor %}
    <li>cost: {{ s.cost.total_wall_s | secs }} in all{% if s.cost.train_wall_s %}, {{ s.cost.train_wall_s | secs }} of training{% endif %};
      peak memory {{ "%.0f" | format(s.cost.peak_rss_mb or 0) }} MB;
      teacher spend {% if s.cost.teacher_usd is not none %}${{ "%.4f" | format(s.cost.teacher_usd) }}{% else %}none{% endif %}</li>
  </ul>
  {% if s.methods %}<div class="small">Same items for every row. Differences: tuned model minus the best prompt on the base
    model, paired bootstrap 95% interval; p: exact McNemar test on the paired items, Holm-adjusted over the methods.</div>
  {% else %}<div class="small">Same items for every prompt; p: exact McNemar test against the best prompt on the paired
    items, Holm-adjusted.</div>{% endif %}
</section>

{% if charts.accuracy %}
<h2>Accuracy: prompts on the base model{% if s.methods %} and tuned models{% endif %}</h2>
<div class="card chart" id="chart-accuracy">{{ charts.accuracy | safe }}</div>
{% endif %}

{% if s.prompts %}
<h2>Prompts</h2>
<div style="overflow-x:auto">
<table id="prompts">
  <thead><tr><th>prompt</th><th>scoring</th><th>accuracy % [95% CI]</th>{% if s.prompts[0].macro_f1 %}<th>macro-F1 %</th>{% endif %}
    <th>compliance %</th><th>prompt tok/item</th><th>ms/item</th><th>vs best</th><th>p (Holm)</th><th>verdict</th></tr></thead>
  <tbody>
  {% for p in s.prompts %}
    <tr class="{{ 'best' if p.is_best }}">
      <td><b>{{ p.variant }}</b></td><td>{{ p.mode }}</td>
      <td class="num">{{ p.accuracy | interval }}</td>
      {% if s.prompts[0].macro_f1 %}<td class="num">{{ p.macro_f1 | interval }}</td>{% endif %}
      <td class="num">{{ p.compliance | interval }}</td>
      <td class="num">{{ "%.0f" | format(p.prompt_tokens_mean) }}</td>
      <td class="num">{{ "%.0f" | format(p.ms_per_item) }}</td>
      <td class="num">{% if p.is_best %}-{% else %}{{ "%+.1f" | format((p.diff_vs_best or 0) * 100) }}{% endif %}</td>
      <td class="num">{% if p.is_best %}-{% else %}{{ p.p_holm | pvalue }}{% endif %}</td>
      <td class="{{ 'good' if p.is_best else ('bad' if p.significant else 'ns') }}">{{ p.verdict }}</td>
    </tr>
  {% endfor %}
  </tbody>
</table>
</div>
{% endif %}

{% if s.methods %}
<h2>Tuned models vs the best prompt</h2>
<div style="overflow-x:auto">
<table id="methods">
  <thead><tr><th>model</th><th>eval prompt</th><th>accuracy % [95% CI]</th>
    <th>vs best prompt, points [95% CI]</th><th>gained / lost</th><th>p (Holm)</th><th>verdict</th>
    <th>vs base model, same prompt</th></tr></thead>
  <tbody>
  {% for m in s.methods %}
    {% set b = m.vs_best or {} %}
    <tr>
      <td><b>{{ m.name }}</b> <span class="small">({{ m.method }})</span></td><td>{{ m.prompt | show }}</td>
      <td class="num">{{ m.accuracy | interval }}</td>
      <td class="num">{{ b | diffci }}</td>
      <td class="num">{% if b.n %}{{ b.gained }} / {{ b.lost }}{% else %}-{% endif %}</td>
      <td class="num">{{ b.p_holm | pvalue }}</td>
      <td class="{{ ('good' if b.diff.value > 0 else 'bad') if b.significant else 'ns' }}">{{ m.verdict or 'not evaluated' }}</td>
      <td class="num">{{ m.vs_before | diffci }}{% if (m.vs_before or {}).n %}, p {{ m.vs_before.p_value | pvalue }}{% endif %}</td>
    </tr>
  {% endfor %}
  </tbody>
</table>
</div>
{% if charts.diff %}<div class="card chart" id="chart-diff">{{ charts.diff | safe }}</div>{% endif %}
{% endif %}

{% if charts.loss %}
<h2>Training</h2>
<div class="card chart" id="chart-loss">{{ charts.loss | safe }}</div>
<div style="overflow-x:auto">
<table id="training">
  <thead><tr><th>model</th><th>train prompt</th><th>examples</th><th>steps</th><th>lr / epochs / r</th>
    <th>trainable</th><th>loss first &rarr; last</th><th>tokens</th><th>tok/s</th><th>time</th><th>forgetting (ppl)</th></tr></thead>
  <tbody>
  {% for m in s.methods if m.train %}
    {% set t = m.train %}
    <tr><td><b>{{ m.name }}</b> <span class="small">({{ t.method }})</span></td><td>{{ t.prompt }}</td>
      <td class="num">{{ t.examples | show }}</td>
      <td class="num">{{ t.steps }}{% if t.resumed_from %} (resumed at {{ t.resumed_from }}){% endif %}</td>
      <td class="num">{{ "%.2g" | format(t.lr) }} / {{ t.epochs }} / {{ t.lora_r or '-' }}</td>
      <td class="num">{{ "%.2f" | format(100 * (t.trainable or 0) / (t.total_params or 1)) }}%</td>
      <td class="num">{{ "%.3f" | format(t.loss_first or 0) }} &rarr; {{ "%.3f" | format(t.loss_last or 0) }}</td>
      <td class="num">{{ "{:,}".format(t.tokens or 0) }}</td><td class="num">{{ "%.0f" | format(t.tok_s or 0) }}</td>
      <td class="num">{{ t.train_seconds | secs }}</td>
      <td class="num">{% if t.forgetting and t.forgetting.perplexity_after %}{{ t.forgetting.perplexity_before }} &rarr; {{ t.forgetting.perplexity_after }} ({{ "%+.1f" | format(t.forgetting.perplexity_change_pct) }}%){% else %}-{% endif %}</td>
    </tr>
  {% endfor %}
  </tbody>
</table>
</div>
{% endif %}

<h2>Cost</h2>
<table id="cost">
  <thead><tr><th>stage</th><th>this run</th><th>wall time</th><th>tokens</th><th>peak memory (RSS)</th><th>teacher spend</th></tr></thead>
  <tbody>
  {% for c in s.cost.stages %}
    <tr><td>{{ c.stage }}</td><td>{{ c.action or c.status }}{% if c.status != 'done' %} ({{ c.status }}){% endif %}</td>
      <td class="num">{{ c.wall_s | secs }}</td><td class="num">{{ "{:,}".format(c.tokens or 0) }}</td>
      <td class="num">{% if c.peak_rss_mb %}{{ "%.0f" | format(c.peak_rss_mb) }} MB{% else %}-{% endif %}</td>
      <td class="num">{% if c.teacher_usd is not none %}${{ "%.4f" | format(c.teacher_usd) }}{% else %}-{% endif %}</td></tr>
  {% endfor %}
  <tr class="total"><td>total</td><td></td><td class="num">{{ s.cost.total_wall_s | secs }}</td>
    <td class="num">{{ "{:,}".format(s.cost.total_tokens or 0) }}</td>
    <td class="num">{{ "%.0f" | format(s.cost.peak_rss_mb or 0) }} MB</td>
    <td class="num">{% if s.cost.teacher_usd is not none %}${{ "%.4f" | format(s.cost.teacher_usd) }}{% else %}-{% endif %}</td></tr>
  </tbody>
</table>
<div class="small">Wall time and memory of the stage when it last ran ("cached" stages were not run again this time).
  Tokens: prompt + completion tokens of eval and teacher calls, tokens trained on for training stages.</div>

{% if examples %}
<h2>Example outputs, side by side</h2>
<div class="small">The same items in every column; items the best prompt got wrong and another column right come
  first, then other disagreements.</div>
<div style="overflow-x:auto">
<table id="examples">
  <thead><tr><th>item</th><th>input</th><th>gold</th>{% for c in example_cols %}<th>{{ c }}</th>{% endfor %}</tr></thead>
  <tbody>
  {% for e in examples %}
    <tr><td>{{ e.item_id }}</td><td><pre>{{ e.input | show | truncate(400) }}</pre></td><td><b>{{ e.gold | show }}</b></td>
      {% for c in e.cells %}
      <td class="{{ 'pred-ok' if c.correct else ('pred-no' if c.correct is sameas false else '') }}">
        <span class="{{ 'ok' if c.correct else 'no' }}">{{ '✓' if c.correct else ('✗' if c.correct is sameas false else '') }}</span>
        {{ c.prediction | show }}
        {% if c.raw and c.raw != (c.prediction | show) %}<pre>{{ c.raw | truncate(300) }}</pre>{% endif %}
      </td>
      {% endfor %}
    </tr>
  {% endfor %}
  </tbody>
</table>
</div>
{% endif %}

{% if serve %}
<h2>Serve</h2>
<div class="card">
  {% for c in serve.commands %}<div><code>{{ c }}</code></div>{% endfor %}
  {% if serve.smoke %}
  <p>Smoke test through the openai client ({{ serve.smoke.served_models | join(", ") }} served), item {{ serve.smoke.item_id }}
    with prompt {{ serve.smoke.prompt }}, gold {{ serve.smoke.gold | show }}:</p>
  <table><thead><tr><th>model</th><th>answer</th><th>latency</th></tr></thead><tbody>
  {% for a in serve.smoke.answers %}<tr><td>{{ a.model }}</td><td>{{ a.answer | show }}</td><td class="num">{{ "%.2f" | format(a.latency_s) }} s</td></tr>{% endfor %}
  </tbody></table>
  {% endif %}
</div>
{% endif %}

<h2>Stages and environment</h2>
<table id="stages">
  <thead><tr><th>stage</th><th>status</th><th>this run</th><th>input hash</th></tr></thead>
  <tbody>
  {% for k, st in s.stages.items() %}<tr><td>{{ k }}</td><td>{{ st.status }}</td><td>{{ st.action | show }}</td><td><code>{{ st.hash }}</code></td></tr>{% endfor %}
  </tbody>
</table>
<p class="small">
  python {{ env.python }} &middot;
  {% for k, ver in (env.packages or {}).items() if ver and k in ('tunelab', 'torch', 'transformers', 'peft') %}{{ k }} {{ ver }} &middot; {% endfor %}
  {% if env.cpu %}{{ env.cpu.model | show }}, {{ env.cpu.cores }} cores{% endif %}
  {% if env.cuda %} &middot; {{ env.cuda.device }}{% endif %}
  {% if env.git and env.git.tunelab %} &middot; tunelab commit {{ env.git.tunelab.commit[:10] }}{% if env.git.tunelab.dirty %} (modified){% endif %}{% endif %}
  &middot; seed {{ env.seed }}
</p>
</main>
</body>
</html>
"""
