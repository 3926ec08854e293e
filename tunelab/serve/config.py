"""Settings of one `tunelab serve` process, validated when built (the CLI flags map onto these fields)."""

from __future__ import annotations

import ipaddress

from pydantic import Field, SecretStr, model_validator

from tunelab.config import StrictModel


class ServeConfig(StrictModel):
    model: str | None = Field(None, description="base model: 'bundled' (default), an HF directory or a .gguf file")
    served_model_name: str | None = Field(None, description="the id clients send for the base model")
    adapters: dict[str, str] = Field(default_factory=dict, description="model name -> PEFT adapter directory")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="when set, every /v1 call needs "
                                                        "'Authorization: Bearer <key>'")
    allow_no_key: bool = Field(False, description="allow binding an interface other than loopback without "
                                                  "an API key")
    admin_key: SecretStr | None = Field(None, description="when set, the /admin endpoints are on and need "
                                                          "'Authorization: Bearer <admin key>' (from "
                                                          "TUNELAB_ADMIN_KEY); without it they are off")
    adapter_roots: list[str] = Field(default_factory=list, description="directories under which /admin may "
                                                                       "register adapters")
    device: str = "auto"
    dtype: str = Field("auto", pattern="^(auto|float32|fp32|bfloat16|bf16)$",
                       description="auto: float32 on a CPU (output does not depend on the batch), the GPU's "
                                   "half precision on CUDA; bfloat16: autocast (output may depend on the batch)")
    # batching
    max_batch: int = Field(32, ge=1, le=1024, description="sequences decoded together in one step")
    max_prefill_tokens: int = Field(4096, ge=16, description="padded prompt tokens prefilled in one forward")
    max_loaded_adapters: int = Field(4, ge=1, le=256, description="adapters kept in memory (LRU)")
    # limits: a request over one gets a 4xx answer
    max_concurrent: int = Field(128, ge=1, description="sequences in flight (each prompt of a request, times "
                                                       "its n); a request that does not fit now gets 429")
    max_sequences_per_request: int = Field(32, ge=1, description="sequences (prompts times n) one request may "
                                                                 "ask for; more get 400 (at most max_concurrent)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body size; larger gets 413")
    max_prompt_tokens: int | None = Field(None, ge=1, description="default: the model's context length")
    max_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens of chat requests that name none")
    max_n: int = Field(8, ge=1, le=16)

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.default_max_tokens > self.max_tokens_limit:
            self.default_max_tokens = self.max_tokens_limit
        if self.max_sequences_per_request > self.max_concurrent:  # a request must fit an idle server
            self.max_sequences_per_request = self.max_concurrent
        if self.admin_key is not None and self.api_key is not None and \
                self.admin_key.get_secret_value() == self.api_key.get_secret_value():
            raise ValueError("the admin key (TUNELAB_ADMIN_KEY) must differ from the API key")
        for name in self.adapters:
            if not name or name != name.strip():
                raise ValueError(f"adapter name {name!r} is empty or has surrounding spaces")
        return self

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None

    def admin_key_value(self) -> str | None:
        return self.admin_key.get_secret_value() if self.admin_key is not None else None
