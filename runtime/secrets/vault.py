"""`harness secrets fetch`: the Vault init container.

Runs once before the pod's main container: logs in to Vault (Kubernetes service-account JWT
or AppRole, credentials read from files only), reads KV v2 secrets, revokes its token, and
writes one file per secret into an in-memory volume that `harness serve` then reads
(`secrets.dir`). Nothing is written until every secret was read and the token revoked, so a
failure leaves the volume as it was. Values are never logged.

Output mapping, one `--secret NAME=PATH[#FIELD]` each, PATH relative to `--kv-mount`:
  `NAME=PATH#FIELD`  file NAME holds that field's value, raw
  `NAME=PATH`        file NAME holds the value of the entry's only field (several: refused)
  `NAME.json=PATH`   file NAME.json holds every field as a JSON object of strings, which the
                     front's loader reads as `NAME.json:FIELD`

Why one module of this size: `harness secrets fetch` is one transaction (log in, read every
secret, revoke the token, then write), and its guarantees (nothing written on failure, no
value logged, the token revoked on every path) are easiest to review when the whole of it is
in view. It is a library with a typed options object (`FetchOptions`); its argument parsing
is in runtime/cli.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets as _random
import ssl
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from runtime import telemetry
from runtime.errors import ConfigError, HarnessError, SecretsError

if TYPE_CHECKING:
    import hvac

DEFAULT_JWT_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
# Where the Vault CLI reads them too; neither is a secret. Every other secret-like name
# (VAULT_TOKEN above all) is refused: hvac would otherwise pick it up silently.
ALLOWED_ENV = ("VAULT_ADDR", "VAULT_CACERT")
MAX_CREDENTIAL_BYTES = 64 << 10
# A plain file name; never a leading dot, which marks our temporary files (and the front's
# loader skips dot files).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")

Auth = Literal["kubernetes", "approle"]
T = TypeVar("T")


@dataclass(frozen=True)
class SecretSpec:
    name: str
    path: str
    field: str | None = None


@dataclass(frozen=True)
class FetchOptions:
    """What `harness secrets fetch` was asked for, as given (the CLI's flags, typed); checked
    and completed by build_plan."""

    auth: Auth
    secret: tuple[str, ...]  # NAME=PATH[#FIELD] each
    out: str
    addr: str | None = None  # default: $VAULT_ADDR
    ca_cert: str | None = None  # default: $VAULT_CACERT
    auth_mount: str | None = None  # default: the auth method's name
    role: str | None = None
    jwt_file: str = DEFAULT_JWT_FILE
    role_id_file: str | None = None
    secret_id_file: str | None = None
    kv_mount: str = "secret"
    timeout: float = 10.0
    unsafe_allow_http: bool = False


@dataclass(frozen=True)
class Plan:
    addr: str
    ca_cert: Path | None
    auth: Auth
    auth_mount: str
    role: str | None
    jwt_file: Path | None
    role_id_file: Path | None
    secret_id_file: Path | None
    kv_mount: str
    specs: tuple[SecretSpec, ...]
    out: Path
    timeout: float = 10.0
    unsafe_allow_http: bool = False


# -- pure: options -> plan; KV data -> file bytes ------------------------------------------


def parse_spec(text: str) -> SecretSpec:
    """`NAME=PATH[#FIELD]` -> SecretSpec; a usage error names what is wrong."""
    usage = "write it as NAME=PATH[#FIELD], e.g. --secret tls.key=harness/front#key"
    name, sep, rest = text.partition("=")
    if not sep:
        raise ConfigError(f"--secret {text!r}: no '='", fix=usage)
    if not _NAME.fullmatch(name) or name.endswith(".tmp"):
        raise ConfigError(
            f"--secret {text!r}: {name!r} is not a plain file name",
            fix="use letters, digits, '.', '_' and '-', not starting with '.'",
        )
    path, sep, field = rest.partition("#")
    path = path.strip("/")
    segments = path.split("/")
    if not path or any(s in ("", ".", "..") for s in segments):
        raise ConfigError(f"--secret {text!r}: {rest!r} is not a KV path", fix=usage)
    if sep and not field:
        raise ConfigError(f"--secret {text!r}: empty field after '#'", fix=usage)
    if sep and name.endswith(".json"):
        raise ConfigError(
            f"--secret {text!r}: a .json file holds every field; '#{field}' picks one",
            fix=f"drop '#{field}', or name the file without .json",
        )
    return SecretSpec(name, path, field if sep else None)


def build_plan(options: FetchOptions, environ: Mapping[str, str]) -> Plan:
    addr = options.addr or environ.get("VAULT_ADDR")
    if not addr:
        raise ConfigError("no Vault address", fix="pass --addr https://vault.example:8200")
    if not addr.startswith(("https://", "http://")):
        raise ConfigError(f"--addr {addr}: not an https:// URL", fix="e.g. https://vault:8200")
    ca = options.ca_cert or environ.get("VAULT_CACERT")
    if options.auth == "kubernetes" and not options.role:
        raise ConfigError(
            "--auth kubernetes needs --role", fix="pass the Vault role bound to this pod's SA"
        )
    if options.auth == "approle":
        if options.role:
            raise ConfigError(
                "--role applies to --auth kubernetes",
                fix="AppRole names its role by --role-id-file; drop --role",
            )
        if not (options.role_id_file and options.secret_id_file):
            raise ConfigError(
                "--auth approle needs --role-id-file and --secret-id-file",
                fix="mount the role_id and secret_id as files (never argv or environment)",
            )
    elif options.role_id_file or options.secret_id_file:
        raise ConfigError("--role-id-file and --secret-id-file apply to --auth approle")
    specs = tuple(parse_spec(s) for s in options.secret)
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"--secret: file name {spec.name} is given twice")
        seen.add(spec.name)
    return Plan(
        addr=addr.rstrip("/"),
        ca_cert=Path(ca) if ca else None,
        auth=options.auth,
        auth_mount=(options.auth_mount or options.auth).strip("/"),
        role=options.role,
        jwt_file=Path(options.jwt_file) if options.auth == "kubernetes" else None,
        role_id_file=Path(options.role_id_file) if options.role_id_file else None,
        secret_id_file=Path(options.secret_id_file) if options.secret_id_file else None,
        kv_mount=options.kv_mount.strip("/"),
        specs=specs,
        out=Path(options.out),
        timeout=options.timeout,
        unsafe_allow_http=options.unsafe_allow_http,
    )


def render(spec: SecretSpec, where: str, data: dict[str, Any]) -> bytes:
    """The bytes of file `spec.name` from the KV entry `data` read at `where`. Pure."""
    fields = ", ".join(sorted(data)) or "none"
    if spec.field is not None:
        if spec.field not in data:
            raise SecretsError(
                f"secret {spec.name}: field {spec.field!r} is not in {where} (its fields: "
                f"{fields})",
                fix="correct the '#FIELD' of --secret, or add the field in Vault",
            )
        return _text(spec.name, where, spec.field, data[spec.field])
    if spec.name.endswith(".json"):
        for key, value in data.items():
            _text(spec.name, where, key, value)
        return json.dumps(data, sort_keys=True, indent=1).encode()
    if len(data) != 1:
        raise SecretsError(
            f"secret {spec.name}: {where} has {len(data)} fields ({fields}), not one",
            fix=f"pick one with --secret {spec.name}={spec.path}#FIELD, or name the file "
            f"{spec.name}.json to write every field as JSON",
        )
    [(key, value)] = data.items()
    return _text(spec.name, where, key, value)


def _text(name: str, where: str, key: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise SecretsError(
            f"secret {name}: field {key!r} of {where} is a {type(value).__name__}, not a string",
            fix="store the value as a string in Vault",
        )
    return value.encode()


# -- I/O: the fetch, top to bottom ---------------------------------------------------------


def fetch(
    plan: Plan,
    environ: Mapping[str, str],
    *,
    mountinfo_path: str = "/proc/self/mountinfo",
    progress: dict[str, Any] | None = None,
) -> list[str]:
    """Log in, read, revoke, write. Returns the names written. `progress` (if given) records
    how far it got, for the event of a failure: `contacted`, `token_revoked`."""
    from runtime.secrets import tmpfs  # pydantic: only paid by this command, not by the whole CLI

    state = progress if progress is not None else {}
    state.update(contacted=False, token_revoked=None)
    # 1. Nothing secret-like in the environment (hvac would use VAULT_TOKEN as is).
    found = tmpfs.secret_env_names(dict(environ), list(ALLOWED_ENV))
    if found:
        raise SecretsError(
            f"secret-like environment variables are set: {', '.join(found)} (values not shown)",
            fix="remove them from this container: Vault credentials come from --jwt-file or "
            "--role-id-file/--secret-id-file; only VAULT_ADDR and VAULT_CACERT are read",
        )
    # 2. TLS verified against the configured CA; cleartext only when explicitly unsafe.
    verify = _tls_verify(plan)
    # 3. The out dir is held open and checked to be in memory before Vault is contacted.
    dir_fd = _open_memory_dir(plan.out, mountinfo_path)
    try:
        # 4. Credentials from files; 5. log in, read every path, revoke; 6. write.
        credentials = _credentials(plan)
        client = _client(plan, verify)
        state["contacted"] = True
        _login(client, plan, credentials)
        try:
            files = {spec.name: _read(client, plan, spec) for spec in plan.specs}
        except BaseException as exc:
            problem = _revoke(client)
            state["token_revoked"] = problem is None
            if problem and isinstance(exc, SecretsError):
                raise SecretsError(
                    f"{exc.message}; and the token could not be revoked: {problem}", fix=exc.fix
                ) from exc
            raise
        problem = _revoke(client)
        state["token_revoked"] = problem is None
        if problem:
            raise SecretsError(
                f"revoking the Vault token failed: {problem}; nothing was written",
                fix="allow update on auth/token/revoke-self (Vault's default policy does)",
            )
        _write_all(dir_fd, plan.out, files)
    finally:
        os.close(dir_fd)
    return list(files)


def _tls_verify(plan: Plan) -> str | bool:
    if plan.addr.startswith("http://"):
        if not plan.unsafe_allow_http:
            raise SecretsError(
                f"--addr {plan.addr} is plain http: the login credential, the Vault token and "
                "the secrets would cross the network unencrypted",
                fix="use Vault's https:// address with --ca-cert; for a local development "
                "Vault only, add --unsafe-allow-http",
            )
        return True
    if plan.ca_cert is None:
        raise SecretsError(
            f"no CA certificate to verify Vault at {plan.addr}",
            fix="pass --ca-cert PEM (or set VAULT_CACERT): the CA that issued Vault's "
            "server certificate",
        )
    try:
        ssl.create_default_context(cafile=str(plan.ca_cert))
    except (OSError, ssl.SSLError) as exc:
        raise SecretsError(
            f"--ca-cert {plan.ca_cert}: {getattr(exc, 'strerror', None) or exc}",
            fix="point --ca-cert at a readable PEM file of CA certificates",
        ) from None
    return str(plan.ca_cert)


def _open_memory_dir(out: Path, mountinfo_path: str) -> int:
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SecretsError(
            f"--out {out}: {exc.strerror}",
            fix="mount an in-memory volume there (Kubernetes: emptyDir with medium: Memory)",
        ) from None
    from runtime.secrets import tmpfs

    # The folder actually opened, whatever symlinks led to it.
    resolved = os.readlink(f"/proc/self/fd/{fd}")
    point, fstype = tmpfs.filesystem_of(resolved, Path(mountinfo_path).read_text())
    if fstype not in tmpfs.MEMORY_FILESYSTEMS:
        os.close(fd)
        raise SecretsError(
            f"--out {out} is on {fstype or 'an unknown filesystem'} (mounted at "
            f"{point or '?'}), not in memory: the secrets would reach a disk",
            fix="mount an in-memory volume there (Kubernetes: emptyDir with medium: Memory)",
        )
    return fd


def _credentials(plan: Plan) -> dict[str, str]:
    if plan.auth == "kubernetes":
        assert plan.jwt_file is not None and plan.role is not None
        return {"role": plan.role, "jwt": _read_credential(plan.jwt_file, "--jwt-file")}
    assert plan.role_id_file is not None and plan.secret_id_file is not None
    return {
        "role_id": _read_credential(plan.role_id_file, "--role-id-file"),
        "secret_id": _read_credential(plan.secret_id_file, "--secret-id-file"),
    }


def _read_credential(path: Path, flag: str) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CREDENTIAL_BYTES + 1)
    except OSError as exc:
        raise SecretsError(
            f"{flag} {path}: {exc.strerror}",
            fix="mount the credential file there, readable by this uid",
        ) from None
    text = data.decode(errors="replace").strip()
    if not text or len(data) > MAX_CREDENTIAL_BYTES:
        raise SecretsError(
            f"{flag} {path}: {'empty' if not text else 'over 64 KiB'}",
            fix="mount the credential file there (one value, no other content)",
        )
    return text


def _client(plan: Plan, verify: str | bool) -> hvac.Client:
    import hvac

    # token="" stops hvac from reading VAULT_TOKEN or ~/.vault-token; no redirects, because
    # requests would resend X-Vault-Token to wherever a redirect points.
    return hvac.Client(
        url=plan.addr, token="", verify=verify, timeout=plan.timeout, allow_redirects=False
    )


def _login(client: hvac.Client, plan: Plan, credentials: dict[str, str]) -> None:
    who = f"{plan.auth} login at auth/{plan.auth_mount}"
    if plan.auth == "kubernetes":
        who += f" as role {plan.role!r}"
        denied = (
            "check --role, that the Vault role's bound_service_account_names/namespaces "
            "match this pod's service account, and that --auth-mount names the Kubernetes "
            "auth mount"
        )

        def call() -> Any:
            return client.auth.kubernetes.login(
                role=credentials["role"], jwt=credentials["jwt"], mount_point=plan.auth_mount
            )
    else:
        denied = "check the role_id and secret_id files (a secret_id expires or is used up)"

        def call() -> Any:
            return client.auth.approle.login(
                role_id=credentials["role_id"],
                secret_id=credentials["secret_id"],
                mount_point=plan.auth_mount,
            )

    response = _vault(plan, who, call, denied=denied, missing=f"enable {plan.auth} auth there")
    token = response.get("auth", {}).get("client_token") if isinstance(response, dict) else None
    if not token:
        raise SecretsError(f"{who}: Vault answered without a client token", fix=denied)
    client.token = token


def _read(client: hvac.Client, plan: Plan, spec: SecretSpec) -> bytes:
    where = f"{plan.kv_mount}/{spec.path}"
    response = _vault(
        plan,
        f"secret {spec.name}: reading {where}",
        lambda: client.secrets.kv.v2.read_secret_version(
            path=spec.path, mount_point=plan.kv_mount, raise_on_deleted_version=True
        ),
        denied=f'grant the role read on path "{plan.kv_mount}/data/{spec.path}"',
        missing=f"check the path (is {plan.kv_mount} a KV v2 mount? is the latest version "
        "deleted?) or write the secret there",
    )
    data = response.get("data", {}).get("data") if isinstance(response, dict) else None
    if not isinstance(data, dict):
        raise SecretsError(
            f"secret {spec.name}: {where} is not a KV v2 entry",
            fix=f"check that {plan.kv_mount} is a KV version 2 mount",
        )
    return render(spec, where, data)


def _revoke(client: hvac.Client) -> str | None:
    """Revoke the token we logged in with; the reason it failed, or None."""
    try:
        response = client.auth.token.revoke_self()
    except Exception as exc:
        return _describe(exc)
    status = getattr(response, "status_code", 200)
    return None if status in (200, 204) else f"HTTP {status}"


def _vault(plan: Plan, action: str, call: Callable[[], T], *, denied: str, missing: str) -> T:
    """One Vault call; any failure becomes a SecretsError naming `action`."""
    import hvac.exceptions
    import requests

    try:
        result = call()
    except requests.exceptions.SSLError as exc:
        raise SecretsError(
            f"{action}: TLS verification of {plan.addr} failed: {_describe(exc)}",
            fix=f"pass the CA that issued Vault's certificate with --ca-cert (now "
            f"{plan.ca_cert}), and use a host name the certificate names in --addr",
        ) from None
    except requests.exceptions.Timeout:
        raise SecretsError(
            f"{action}: Vault at {plan.addr} did not answer within {plan.timeout:g} s",
            fix="check that Vault is up and unsealed; raise --timeout if it is slow",
        ) from None
    except requests.exceptions.RequestException as exc:
        raise SecretsError(
            f"{action}: cannot reach Vault at {plan.addr}: {_describe(exc)}",
            fix="check --addr, DNS, and that a NetworkPolicy lets this pod reach Vault",
        ) from None
    except (
        hvac.exceptions.Forbidden,
        hvac.exceptions.Unauthorized,
        hvac.exceptions.InvalidRequest,  # Vault's answer to an unknown role or a bad secret_id
    ) as exc:
        raise SecretsError(f"{action}: refused by Vault: {_describe(exc)}", fix=denied) from None
    except hvac.exceptions.InvalidPath:
        raise SecretsError(f"{action}: not found", fix=missing) from None
    except hvac.exceptions.VaultError as exc:
        raise SecretsError(
            f"{action}: Vault answered {type(exc).__name__}: {_describe(exc)}",
            fix="see Vault's server log for this request",
        ) from None
    status = getattr(result, "status_code", None)
    if status is not None:  # hvac hands back the raw response for anything but 200
        location = result.headers.get("location")  # type: ignore[attr-defined]
        raise SecretsError(
            f"{action}: unexpected HTTP {status}"
            + (f" (redirect to {location})" if location else ""),
            fix="point --addr at the active Vault node or its load balancer",
        )
    return result


def _describe(exc: BaseException) -> str:
    """The useful part of a requests/hvac error (requests nests it several layers deep)."""
    text = str(exc)
    ssl_reason = re.search(r"\[SSL[^\]]*\] ([^(')]+)", text)
    if ssl_reason:
        return ssl_reason.group(1).strip()
    os_reason = re.search(r"\[Errno -?\d+\] [^\"')]+", text)
    if os_reason:
        return os_reason.group(0).strip()
    errors = getattr(exc, "errors", None)
    if errors:
        return "; ".join(str(e) for e in errors)
    return re.sub(r", on (get|post) \S+$", "", text) or type(exc).__name__


def _write_all(dir_fd: int, out: Path, files: dict[str, bytes]) -> None:
    """Every file to a private temporary name first (0400, fsynced), then renamed into place:
    a reader sees an old complete file or a new complete file, never a partial one."""
    temps: dict[str, str] = {}
    name = ""
    try:
        for name in files:  # a folder in the way would fail only at its rename, too late
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISDIR(os.lstat(name, dir_fd=dir_fd).st_mode):
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        for name, data in files.items():
            temp = f".{name}.{_random.token_hex(6)}.tmp"
            fd = os.open(
                temp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o400,
                dir_fd=dir_fd,
            )
            temps[name] = temp
            try:
                os.fchmod(fd, 0o400)  # whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in files:
            os.rename(temps[name], name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            del temps[name]
        os.fsync(dir_fd)
    except OSError as exc:
        raise SecretsError(
            f"writing secret {name} into {out}: {exc.strerror}",
            fix=f"make {out} writable by this uid, and remove anything in the way of {name}",
        ) from None
    finally:
        for temp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=dir_fd)


# -- the command ---------------------------------------------------------------------------


def run(options: FetchOptions, environ: Mapping[str, str]) -> int:
    """`harness secrets fetch`: events, the fetch, its exit code (errors raise, with theirs)."""
    plan = build_plan(options, environ)
    summary: dict[str, Any] = {
        "mode": "vault",
        "addr": plan.addr,
        "auth": plan.auth,
        "auth_mount": plan.auth_mount,
        "role": plan.role,
        "kv_mount": plan.kv_mount,
        "out": str(plan.out),
        # names and paths only, never values
        "secrets": [{"name": s.name, "path": s.path, "field": s.field} for s in plan.specs],
    }
    if plan.unsafe_allow_http and plan.addr.startswith("http://"):
        print(
            "harness: warning: --unsafe-allow-http: Vault traffic is in clear text", file=sys.stderr
        )
        telemetry.emit(
            "unsafe_setting",
            "allowed",
            setting="--unsafe-allow-http",
            risk="the login credential, the Vault token and the secrets cross the network in "
            "clear text",
        )
    progress: dict[str, Any] = {}
    try:
        written = fetch(plan, environ, progress=progress)
    except HarnessError as exc:
        outcome: telemetry.Outcome = "failed" if progress.get("contacted") else "blocked"
        telemetry.emit(
            "secret_injection",
            outcome,
            **summary,
            token_revoked=progress.get("token_revoked"),
            error=exc.message,
        )
        raise
    telemetry.emit("secret_injection", "ok", **summary, count=len(written), token_revoked=True)
    print(f"wrote {len(written)} secrets to {plan.out}: {', '.join(written)}", file=sys.stderr)
    return 0
