"""The TOML configuration, validated into one typed, immutable object.

Every module reads this one schema. Unknown keys are errors (a typo in a security setting
must never be silently ignored); relative paths are resolved against the config file's folder.

Why one module of this size: the schema is one document. Every section, its defaults, bounds
and cross-field checks sit together, so that a reviewer reads every setting harness accepts
in one place; docs/configuration.md is held to these models key by key (tests/unit/test_docs.py).
"""

from __future__ import annotations

import ipaddress
import re
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from runtime import vllm_options
from runtime.errors import ConfigError


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base", Path.cwd())
    return (base / value.expanduser()).resolve() if not value.is_absolute() else value


ConfigPath = Annotated[Path, AfterValidator(_resolve)]

# Names that must never reach the engine, whatever `env_passthrough` says.
SECRET_LIKE = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|PRIVATE_KEY|CREDENTIALS?)($|_)"
    r"|^(VAULT_|AWS_SECRET|HF_TOKEN|HUGGING_FACE_HUB_TOKEN)",
    re.IGNORECASE,
)

# Engine variables that would load code or adapters past verification, whatever
# `env_passthrough` says.
ENGINE_ENV_REFUSED = {
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "lets the engine load unverified adapters at run time",
    "VLLM_PLUGINS": "loads Python plugins into the engine",
    "VLLM_LORA_RESOLVER_CACHE_DIR": "lets the engine load unverified adapters at run time",
    "VLLM_USE_MODELSCOPE": "makes the engine download from ModelScope",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SignatureSection(_Section):
    # The OMS v1.0 bundle (model_signing / harness sign); may sit inside the model dir.
    path: ConfigPath
    method: Literal["key", "certificate", "sigstore"] = "key"
    # `key`: the signer's PEM ECDSA public key.
    public_key: ConfigPath | None = None
    # `certificate`: PEM root CA(s) (and intermediates).
    certificate_chain: list[ConfigPath] = Field(default_factory=list)
    # `sigstore`: the pinned trusted_root.json (or client trust config) and the OIDC issuer.
    trust_config: ConfigPath | None = None
    issuer: str | None = None
    # `certificate` and `sigstore`: the signer identities (SAN email/URI) you trust.
    identities: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _material(self) -> SignatureSection:
        wanted = {
            "key": {"public_key"},
            "certificate": {"certificate_chain", "identities"},
            "sigstore": {"trust_config", "issuer", "identities"},
        }[self.method]
        given = {
            name
            for name in ("public_key", "certificate_chain", "trust_config", "issuer", "identities")
            if getattr(self, name)
        }
        if given != wanted:
            raise ValueError(
                f"method {self.method!r} takes {', '.join(sorted(wanted))}"
                + (f"; not {', '.join(sorted(given - wanted))}" if given - wanted else "")
                + (f"; missing {', '.join(sorted(wanted - given))}" if wanted - given else "")
            )
        return self


SERVED_NAME = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"


class ArtifactSection(_Section):
    """A folder of weights the engine loads: the model, a LoRA adapter, a draft model. Each
    is verified the same way (signature, SHA-256 of every file, the model-dir policy)."""

    dir: ConfigPath
    signature: SignatureSection | None = None
    # Development only: serve weights nobody signed (still policy- and header-checked).
    unsafe_unsigned: bool = False
    # Development only: serve from a folder that harness's uid could modify.
    unsafe_allow_writable: bool = False

    @model_validator(mode="after")
    def _signed(self) -> ArtifactSection:
        if self.signature is None and not self.unsafe_unsigned:
            raise ValueError(
                "[signature] is missing: harness serves only signed weights (sign with "
                "`harness sign`); for development only, set unsafe_unsigned = true"
            )
        if self.signature is not None and self.unsafe_unsigned:
            raise ValueError("set either [signature] or unsafe_unsigned, not both")
        return self


class ModelSection(ArtifactSection):
    served_name: str = Field(pattern=SERVED_NAME)


class LoraSection(ArtifactSection):
    """[[engine.lora]]: a LoRA adapter (PEFT: adapter_config.json + safetensors), loaded at
    start and served under `name`, which requests then name as their `model`."""

    name: str = Field(pattern=SERVED_NAME)


class DraftSection(ArtifactSection):
    """[engine.draft]: a smaller model with the same vocabulary, proposing tokens that the
    model checks (vLLM's speculative decoding, method "draft_model")."""

    num_speculative_tokens: int = Field(default=3, ge=1, le=16)


class TLSSection(_Section):
    cert: ConfigPath
    key: ConfigPath
    client_ca: ConfigPath


class FrontSection(_Section):
    listen: str = "127.0.0.1:8443"
    tls: TLSSection
    # Client identities (SAN URI such as spiffe://..., SAN DNS name, or SAN email) allowed in.
    allowed_identities: list[str] = Field(min_length=1)
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    drain_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # Connections past their TLS handshake, open at once; past it a new one is closed before
    # any HTTP is read (a gateway's pool needs far fewer: max_concurrency + max_queue requests
    # are admitted at a time).
    max_connections: int = Field(default=1024, ge=1, le=65536)
    # TLS handshakes in progress at once (~55 KiB each, before anyone is authenticated); past
    # it a new connection is closed as it is accepted.
    max_handshakes: int = Field(default=256, ge=1, le=65536)
    # Of those, from one client address: bare TCP connects from one address cannot hold every
    # slot and lock the others out. Unset: 64, or max_handshakes if lower. 64 is a quarter of
    # the default max_handshakes (four addresses to fill it), and well above what a gateway's
    # pool has in flight at once, even in a burst: a handshake takes the front about a
    # millisecond. Clients behind one NAT or gateway address share it.
    max_handshakes_per_client: int | None = Field(default=None, ge=1, le=65536)
    # Admission: requests in the engine at once, and how many may wait for a slot (429 past it).
    max_concurrency: int = Field(default=16, ge=1, le=4096)
    max_queue: int = Field(default=16, ge=0, le=4096)
    queue_timeout_s: float = Field(default=10.0, gt=0, le=600)
    # Per client identity: requests per second (0 = off) and burst.
    rate_limit_rps: float = Field(default=0.0, ge=0)
    rate_limit_burst: int = Field(default=20, ge=1)
    # Slow clients: the TLS handshake must be done within handshake_timeout_s of the connect,
    # the request head must arrive within header_timeout_s (slowloris), idle keep-alive
    # connections close after keepalive_timeout_s, and a whole request (body, generation,
    # streaming) ends at request_deadline_s.
    handshake_timeout_s: float = Field(default=10.0, gt=0, le=600)
    header_timeout_s: float = Field(default=10.0, gt=0, le=600)
    keepalive_timeout_s: float = Field(default=5.0, gt=0, le=600)
    request_deadline_s: float = Field(default=600.0, gt=0, le=86400)
    # Slow bodies: a request's whole body must arrive within body_timeout_s of its head, and
    # from its first second on at min_body_bytes_per_s on average (0: no minimum; Apache's
    # mod_reqtimeout asks 500), else 408 and the connection is closed. A body trickled a byte
    # a second held its connection and bytes until request_deadline_s. A larger
    # max_body_bytes may need a longer body_timeout_s (1 MiB in 30 s is 35 KB/s).
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    min_body_bytes_per_s: int = Field(default=1024, ge=0, le=1 << 30)
    # Request body bytes the front holds at once, across all connections, from their arrival
    # until each body is handed to the engine; past it a request gets 503 with Retry-After.
    # Bounds the front's memory under many slow bodies; at least max_body_bytes.
    max_buffered_body_bytes: int = Field(default=64 << 20, ge=1024, le=16 << 30)
    # Prometheus scrape endpoint, loopback only (e.g. "127.0.0.1:9464"); empty = off.
    metrics_listen: str = ""

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_loopback(cls, value: str) -> str:
        if value:
            host, _port = split_listen(value)
            if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                raise ValueError("the metrics endpoint has no TLS: it must listen on loopback")
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @field_validator("allowed_identities")
    @classmethod
    def _identities(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item or item != item.strip() or "*" in item:
                raise ValueError(f"{item!r}: identities are exact strings, no wildcards or spaces")
        return value

    @model_validator(mode="after")
    def _body_budget(self) -> FrontSection:
        if self.max_buffered_body_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_buffered_body_bytes ({self.max_buffered_body_bytes}) is less than "
                f"max_body_bytes ({self.max_body_bytes}): one request could never be read; "
                f"raise max_buffered_body_bytes to at least {self.max_body_bytes}"
            )
        return self

    @property
    def handshakes_per_client(self) -> int:
        """front.max_handshakes_per_client, or its default."""
        return self.max_handshakes_per_client or min(64, self.max_handshakes)

    @model_validator(mode="after")
    def _handshakes_per_client(self) -> FrontSection:
        per_client = self.max_handshakes_per_client
        if per_client is not None and per_client > self.max_handshakes:
            raise ValueError(
                f"max_handshakes_per_client ({per_client}) is more than max_handshakes "
                f"({self.max_handshakes}): lower it to at most {self.max_handshakes}, or raise "
                "max_handshakes"
            )
        return self


class StructuredOutputsSection(_Section):
    # Grammar-guided decoding through `response_format`. The engine compiles each schema into
    # a grammar before the first token, on its own CPU (seconds for a schema of a thousand
    # properties), so it is off unless a model team needs it. "json_object": any JSON object;
    # "json_schema": that, and JSON schemas within the caps below (their bytes also count in
    # limits.max_prompt_bytes). `structural_tag`, grammars and regexes are never forwarded.
    allow: Literal["off", "json_object", "json_schema"] = "off"
    max_schema_bytes: int = Field(default=8 << 10, ge=64, le=1 << 20)
    max_schema_depth: int = Field(default=8, ge=2, le=64)
    max_schema_properties: int = Field(default=64, ge=1, le=4096)  # in all, at every level


class MediaSection(_Section):
    # Media in chat messages: the part types forwarded (empty: none, the default). Only
    # inline `data:` URLs (base64) are: never http(s) or file URLs, which the engine would
    # fetch or open itself. Each part's data counts in limits.max_prompt_bytes too.
    parts: list[Literal["image_url", "audio_url", "video_url", "input_audio"]] = Field(
        default_factory=list
    )
    max_parts: int = Field(default=4, ge=1, le=64)  # media parts per request
    max_part_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)  # its data: URL


class ToolsSection(_Section):
    # Function calling in chat requests: `tools`, `tool_choice`, `parallel_tool_calls`, and
    # the assistant `tool_calls` and `tool` messages of a conversation. Off by default.
    # The tools' `parameters` are JSON schemas held to the caps of limits.structured_outputs
    # (depth each, bytes and properties all together: "required" joins them in one grammar);
    # the chat template writes the tools into the prompt (their bytes count in
    # limits.max_prompt_bytes). Any tool_choice but "none" ("auto" is the default with tools)
    # needs the engine's parser: engine.vllm.enable_auto_tool_choice and tool_call_parser,
    # and, as tools with `strict: true` do, structured_outputs.allow = "json_schema": vLLM's
    # tool parsers compile the tools' schemas into grammars ("required", named choices,
    # strict tools, parallel_tool_calls = false, and with some parsers every "auto").
    allow: bool = False
    max_tools: int = Field(default=16, ge=1, le=128)  # tools per request


class LimitsSection(_Section):
    # Hard cap on generated tokens per request; also passed to vLLM as max_new_tokens.
    max_tokens: int = Field(default=256, ge=1, le=1 << 20)
    # Over the cap: `reject` with 400 (default) or `clamp` to the cap.
    max_tokens_policy: Literal["reject", "clamp"] = "reject"
    # Injected when a request names none (0: the cap).
    default_max_tokens: int = Field(default=0, ge=0)
    max_n: int = Field(default=1, ge=1, le=64)  # n and best_of
    max_logprobs: int = Field(default=5, ge=0, le=20)  # logprobs / top_logprobs
    max_prompts: int = Field(default=8, ge=1, le=1024)  # prompts per completions request
    max_prompt_bytes: int = Field(default=256 << 10, ge=64)  # serialised prompt or messages
    max_stop: int = Field(default=4, ge=0, le=64)  # stop strings, stop_token_ids
    max_json_depth: int = Field(default=32, ge=4, le=256)
    structured_outputs: StructuredOutputsSection = StructuredOutputsSection()
    media: MediaSection = MediaSection()
    tools: ToolsSection = ToolsSection()


class EngineSection(_Section):
    device: Literal["cpu", "cuda"] = "cpu"
    # Parent of the engine's private runtime dir (its socket, tmp and caches).
    runtime_dir: ConfigPath = Path("/tmp")  # noqa: S108 - a private 0700 subdir is made inside
    python: ConfigPath = Path(sys.executable)
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int = Field(default=16, ge=1, le=4096)
    # Needed on CPU: without it vLLM sizes the KV cache from 0.92 of RAM.
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1 << 20)
    ready_timeout_s: float = Field(default=600.0, gt=0)
    # Once ready, the engine's /health is polled; unanswered this long: event, exit 6.
    liveness_timeout_s: float = Field(default=60.0, ge=1, le=3600)
    stop_timeout_s: float = Field(default=20.0, gt=0, le=600)
    # When harness starts as root, the engine runs as this non-root uid/gid.
    uid: int = Field(default=65534, ge=1, le=(1 << 32) - 2)
    gid: int = Field(default=65534, ge=1, le=(1 << 32) - 2)
    # Development only: keep the engine's uid 0 (capabilities are still all dropped).
    unsafe_run_as_root: bool = False
    # Extra variables copied from harness's environment into the engine's (allowlist).
    env_passthrough: list[str] = Field(default_factory=list)
    # vLLM engine options (dtype, quantization, tensor_parallel_size, prefix caching, ...):
    # the allowlist and each value's check are in runtime/vllm_options.py. Options that
    # load code or reach outside the verified model are refused by name.
    vllm: dict[str, Any] = Field(default_factory=dict)
    # LoRA adapters loaded at start, each verified like the weights; none loads at run time.
    lora: list[LoraSection] = Field(default_factory=list, max_length=64)
    # A draft model for speculative decoding, verified like the weights.
    draft: DraftSection | None = None

    @field_validator("vllm")
    @classmethod
    def _vllm_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        return vllm_options.validate(value)

    @field_validator("lora")
    @classmethod
    def _lora_names(cls, value: list[LoraSection]) -> list[LoraSection]:
        seen: set[str] = set()
        for adapter in value:
            if adapter.name in seen:
                raise ValueError(f"two adapters are named {adapter.name!r}; names must differ")
            seen.add(adapter.name)
        return value

    @model_validator(mode="after")
    def _lora_options(self) -> EngineSection:
        given = sorted(vllm_options.LORA_OPTIONS & self.vllm.keys())
        if given and not self.lora:
            raise ValueError(
                f"engine.vllm.{given[0]} is set but no [[engine.lora]] adapter is: "
                "add an adapter or remove the option"
            )
        return self

    # CPU memory cap: the engine's process tree, summed as PSS (docs/sandbox.md, Memory caps);
    # over it, the engine is stopped and harness exits 6. "auto": 90% of the memory harness may use
    # (its cgroup's memory.max, else the machine's), so that the engine is stopped with an
    # event before the kernel's OOM killer picks a process. "off": none.
    max_rss_bytes: int | str = "auto"

    @field_validator("max_rss_bytes")
    @classmethod
    def _rss_cap(cls, value: int | str) -> int | str:
        if value in ("auto", "off"):
            return value
        if isinstance(value, (str, bool)) or value < 16 << 20:
            raise ValueError('bytes (an integer of at least 16 MiB), "auto" or "off"')
        return value

    # The size of the engine's own /dev/shm (a tmpfs in its mount namespace; vLLM and torch
    # share tensors and queues there). Memory is used only as written, and counts against
    # the pod's limit, not max_rss_bytes.
    shm_bytes: int = Field(default=1 << 30, ge=16 << 20)
    # Processes and threads the engine may have at once (RLIMIT_NPROC; in its own user
    # namespace only its own count; as root every task of engine.uid counts, so give each
    # instance on a host its own uid). vLLM on a CPU uses about 2 per core plus ~40; the rest
    # stops a fork bomb. Reaching it is a `task_cap_reached` event.
    max_tasks: int = Field(default=4096, ge=64, le=1 << 22)
    # GPU memory per device: bytes (an integer) or a fraction 0 < x <= 1 of the device (a
    # float, 1.0 = all of it); becomes vLLM's --gpu-memory-utilization and the watchdog's cap.
    gpu_memory_limit: int | float | None = None
    # CPUs for the engine's compute threads, as a Linux CPU list ("1", "2-7", "2-5,8"): vLLM's
    # OpenMP threads are bound to them (VLLM_CPU_OMP_THREADS_BIND) and harness keeps the front
    # on the other CPUs it may use. "auto": the front gets the last CPU harness may use and the
    # engine the others (CPU numbers in a pod's cpuset are not known in advance). Unset: vLLM
    # picks its own, and the front runs anywhere.
    cpus: str | None = None

    @field_validator("cpus")
    @classmethod
    def _cpu_list(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if info.data.get("device") != "cpu":
            raise ValueError('applies to device = "cpu" only')
        if value == "auto":
            return value
        return format_cpu_list(parse_cpu_list(value))

    @field_validator("gpu_memory_limit")
    @classmethod
    def _gpu_limit(cls, value: int | float | None, info: ValidationInfo) -> int | float | None:
        if value is None:
            return None
        if info.data.get("device") != "cuda":
            raise ValueError('applies to device = "cuda" only')
        if isinstance(value, bool) or (isinstance(value, int) and value < 1 << 20):
            raise ValueError("bytes (an integer of at least 1 MiB), or a fraction such as 0.8")
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError("a fraction must be above 0 and at most 1.0 (bytes are integers)")
        return value

    @field_validator("env_passthrough")
    @classmethod
    def _no_secrets(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if SECRET_LIKE.search(name):
                raise ValueError(f"{name!r} looks like a secret; the engine never gets secrets")
            if name in ENGINE_ENV_REFUSED:
                raise ValueError(f"{name!r} is refused: it {ENGINE_ENV_REFUSED[name]}")
        return value


class SandboxSection(_Section):
    """What confines the engine beyond its uid (docs/sandbox.md)."""

    # Filesystem, TCP and scope rules. `best_effort` enforces what the kernel's Landlock ABI
    # offers and reports the rest; `required` refuses to start without Landlock.
    landlock: Literal["best_effort", "required", "off"] = "best_effort"
    # The engine's own mount (a root holding only what it may use), network (only a loopback)
    # and IPC namespaces, in a user namespace of its own when harness is not root. `auto`:
    # used when the node allows them, otherwise an event says why not; `required`: refuse to
    # start without them (exit 5).
    namespaces: Literal["auto", "required", "off"] = "auto"
    # enforce: unlisted syscalls fail with EPERM and raise a seccomp_violation event; kill: the
    # kernel kills the process; complain: allowed, events only; off: development only.
    seccomp: Literal["enforce", "kill", "complain", "off"] = "enforce"
    # An OCI seccomp profile recorded by `harness profile`; default: the shipped
    # seccomp/engine-<device>.json.
    seccomp_profile: ConfigPath | None = None
    # The seccomp profile the container runtime applies to harness itself (OCI format). What it
    # refuses fails with ENOSYS and no event; harness's own filter then refuses those calls
    # first, with EPERM and a seccomp_violation event (docs/sandbox.md). `auto`: the image's
    # copy of the shipped profile (/usr/share/harness/seccomp/harness-cpu.json, -gpu on CUDA)
    # when harness starts under a filter that refuses as that profile does (times(2): ENOSYS);
    # `off`: the front's deny list alone. A path: that profile, an allowlist (exit 2 if not).
    container_profile: Literal["auto", "off"] | ConfigPath = "auto"
    # TCP ports the engine may bind or connect to (Landlock ABI >= 4). torch.distributed needs
    # a rendezvous port, which harness picks and adds itself.
    allowed_tcp_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=list)
    # More folders the engine may read (and execute), or write, beyond what harness derives.
    extra_read_paths: list[ConfigPath] = Field(default_factory=list)
    extra_write_paths: list[ConfigPath] = Field(default_factory=list)


class SecretsSection(_Section):
    # An in-memory volume (tmpfs/ramfs) holding one file per secret; read by the front only.
    dir: ConfigPath | None = None
    max_file_bytes: int = Field(default=64 << 10, ge=1, le=16 << 20)
    # Secrets that must be there (file name, or FILE:KEY for .json/.env files).
    required: list[str] = Field(default_factory=list)
    # Secret-like environment variable names that are known not to be secrets.
    allow_env: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _dir_for_required(self) -> SecretsSection:
        if self.required and self.dir is None:
            raise ValueError("'required' needs 'dir'")
        return self


class TelemetrySection(_Section):
    """OTLP/HTTP export of the events, startup spans and request metrics (docs/events.md)."""

    # The collector's base URL; /v1/traces, /v1/logs and /v1/metrics are added. Empty: off.
    otlp_endpoint: str = ""
    service_name: str = Field(default="harness", min_length=1, max_length=255)
    # A file name in secrets.dir holding the collector's headers (KEY=VALUE lines, or a .json
    # or .env secret whose keys are the header names), such as an Authorization token.
    otlp_headers_file: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # TLS to the collector: the CA that issued its certificate (default: the system's), and a
    # client certificate whose key is a file name in secrets.dir.
    otlp_ca: ConfigPath | None = None
    otlp_client_cert: ConfigPath | None = None
    otlp_client_key_file: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    export_interval_s: float = Field(default=10.0, gt=0, le=3600)
    export_timeout_s: float = Field(default=5.0, gt=0, le=60)

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value:
            url = urlsplit(value)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError("an http:// or https:// URL such as https://collector:4318")
            if url.username or url.password or url.query or url.fragment:
                raise ValueError("no credentials, query or fragment (headers go in a secret)")
        return value

    @model_validator(mode="after")
    def _credentials_over_tls(self) -> TelemetrySection:
        if (self.otlp_client_cert is None) != (self.otlp_client_key_file is None):
            raise ValueError("otlp_client_cert and otlp_client_key_file go together")
        url = urlsplit(self.otlp_endpoint)
        if url.scheme == "http":
            if self.otlp_ca or self.otlp_client_cert:
                raise ValueError("otlp_ca and a client certificate need an https:// endpoint")
            if self.otlp_headers_file and not _is_loopback(url.hostname or ""):
                raise ValueError(
                    "the collector's headers are credentials: send them over https://, "
                    "or to a collector on loopback"
                )
        return self


def parse_cpu_list(text: str) -> frozenset[int]:
    """A Linux CPU list ("0", "2-7", "2-5,8") as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f'{text!r} is not "auto" or a CPU list such as "1", "2-7" or "2-5,8"')
        first, last = int(low), int(high) if dash else int(low)
        if last < first or last >= 4096:
            raise ValueError(f"{part!r} is not a CPU range")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: frozenset[int] | set[int]) -> str:
    """The shortest Linux CPU list for a set: {0, 1, 2, 5} -> "0-2,5"."""
    parts: list[str] = []
    for cpu in sorted(cpus):
        if parts and cpu == int(parts[-1].rpartition("-")[2]) + 1:
            parts[-1] = f"{parts[-1].partition('-')[0]}-{cpu}"
        else:
            parts.append(str(cpu))
    return ",".join(parts)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Config(_Section):
    model: ModelSection
    front: FrontSection
    limits: LimitsSection = LimitsSection()
    engine: EngineSection = EngineSection()
    secrets: SecretsSection = SecretsSection()
    sandbox: SandboxSection = SandboxSection()
    telemetry: TelemetrySection = TelemetrySection()
    source: Path = Path("<memory>")

    @model_validator(mode="after")
    def _served_names(self) -> Config:
        for adapter in self.engine.lora:
            if adapter.name == self.model.served_name:
                raise ValueError(
                    f"engine.lora {adapter.name!r}: the model is served under that name; "
                    "give the adapter a name of its own"
                )
        return self

    @model_validator(mode="after")
    def _tool_parsing(self) -> Config:
        vllm = self.engine.vllm
        auto, parser = vllm.get("enable_auto_tool_choice", False), "tool_call_parser" in vllm
        if auto and not parser:
            raise ValueError(
                "engine.vllm.enable_auto_tool_choice needs engine.vllm.tool_call_parser "
                "(the parser for this model's tool-call format)"
            )
        if parser and not auto:
            raise ValueError(
                "engine.vllm.tool_call_parser is used only with "
                "engine.vllm.enable_auto_tool_choice = true"
            )
        if auto and not self.limits.tools.allow:
            raise ValueError(
                "engine.vllm.enable_auto_tool_choice: the front forwards `tools` only with "
                "limits.tools.allow = true"
            )
        if auto and self.limits.structured_outputs.allow != "json_schema":
            raise ValueError(
                "engine.vllm.enable_auto_tool_choice: vLLM's tool-call parsers compile the "
                "tools' schemas into grammars, which needs limits.structured_outputs.allow = "
                '"json_schema" (its caps then hold for the tools)'
            )
        return self

    def artifacts(self) -> list[tuple[str, ArtifactSection]]:
        """Every folder of weights the engine loads, with the config key that names it."""
        named: list[tuple[str, ArtifactSection]] = [("model", self.model)]
        named += [(f"engine.lora[{a.name}]", a) for a in self.engine.lora]
        if self.engine.draft is not None:
            named.append(("engine.draft", self.engine.draft))
        return named

    @property
    def served_names(self) -> tuple[str, ...]:
        """What requests may name as `model`: the model's name, then each adapter's."""
        return (self.model.served_name, *(a.name for a in self.engine.lora))


def split_listen(value: str) -> tuple[str, int]:
    """'127.0.0.1:8443' or '[::1]:8443' -> (host, port)."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([0-9.]+|localhost):(\d{1,5})", value)
    if not match:
        raise ValueError(f"{value!r} is not HOST:PORT (an IP address, or [IPv6]:PORT)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if host != "localhost":
        ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return host, port


def _set_dotted(data: dict[str, Any], dotted: str, raw: str) -> None:
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a table")
    node[leaf] = value


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, apply `KEY.PATH=VALUE` overrides, validate. Raises ConfigError (exit 2)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file", fix="pass --config with an existing TOML file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{path}: cannot read: {exc}", fix="check the file's permissions and encoding (UTF-8)"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", fix="fix the TOML syntax") from exc
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE")
        _set_dotted(data, key.strip(), raw.strip())
    if "source" in data:
        raise ConfigError(f"{path}: unknown key 'source'", fix="remove it")
    data["source"] = path.resolve()
    try:
        return Config.model_validate(data, context={"base": path.resolve().parent})
    except ValidationError as exc:
        raise ConfigError(_describe(path, exc), fix=_fix(exc)) from None


# Keys that moved: the error names the new place.
RENAMED = {"engine.network_namespace": "sandbox.namespaces"}


def _describe(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            moved = f" (it is now '{RENAMED[key]}')" if key in RENAMED else ""
            lines.append(f"{path}: unknown key '{key}'{moved}")
        elif err["type"] == "missing":
            lines.append(f"{path}: missing required key '{key}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{path}: '{key}': {msg}{shown}")
    return "\n  ".join(lines)


def _fix(exc: ValidationError) -> str:
    kinds = {err["type"] for err in exc.errors()}
    if "extra_forbidden" in kinds:
        return "check the spelling against the configuration reference, docs/configuration.md"
    return "correct the values named above (see docs/configuration.md)"
