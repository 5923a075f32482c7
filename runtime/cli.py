"""Command line. The only place where errors become exit codes (docs/design.md):
0 ok · 2 usage/config · 3 weight integrity · 4 secrets · 5 sandbox · 6 engine · 1 a bug.

Why one module of this size: it is the only place where errors become exit codes; each
subcommand is a short function over a library call (arguments in, printing out), so one file
shows every command, every flag and every exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from runtime import __version__, telemetry
from runtime.errors import ConfigError, HarnessError
from runtime.secrets import vault


def _serve(args: argparse.Namespace) -> int:
    from runtime import launcher

    return launcher.serve(args.config, args.set)


def _check(args: argparse.Namespace) -> int:
    from runtime import check

    telemetry.set_stream(sys.stderr)  # stdout is the report
    report = check.report(args.config, args.set)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(check.render(report))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from runtime.integrity import signature

    telemetry.set_stream(sys.stderr)
    trust: signature.Trust
    if args.public_key:
        if args.identity:
            raise ConfigError("--identity applies to --certificate-chain, not --public-key")
        trust = signature.KeyTrust(Path(args.public_key))
    elif args.sigstore_identity:
        if not (args.sigstore_issuer and args.trust_config):
            raise ConfigError(
                "--sigstore-identity needs --sigstore-issuer and --trust-config",
                fix="pass the OIDC issuer URL and your Sigstore instance's trusted_root.json",
            )
        trust = signature.SigstoreTrust(
            Path(args.trust_config), tuple(args.sigstore_identity), args.sigstore_issuer
        )
    else:
        trust = signature.CertificateTrust(
            tuple(Path(p) for p in args.certificate_chain),
            tuple(args.identity) if args.identity else None,
        )
        if not args.identity:
            print(
                "harness: warning: no --identity given: any signer the CA vouches for is accepted",
                file=sys.stderr,
            )
    result = signature.verify_model(
        Path(args.model_dir),
        Path(args.signature),
        trust,
        progress=_progress_bar if sys.stderr.isatty() and not args.json else None,
        kind=None,  # a model or a LoRA adapter
    )
    verified = result.verified
    report = {
        "ok": True,
        "model": str(verified.root),
        "signature": str(result.signature),
        "method": result.method,
        "signer": result.signer,
        "identity": result.identity,
        "identity_checked": not isinstance(trust, signature.CertificateTrust)
        or trust.identities is not None,
        "root_digest": result.root_digest,
        "key_match": result.key_match,
        "unsigned_empty_files": list(result.unsigned_empty_files),
        "files": verified.digests,
        "bytes": verified.total_bytes,
        "tensors": verified.tensors,
        "seconds": round(verified.seconds, 3),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        rate = verified.total_bytes / 1e6 / verified.seconds if verified.seconds else 0
        print(
            f"verified {len(verified.files)} files, {verified.total_bytes} bytes in "
            f"{verified.seconds:.2f} s ({rate:.0f} MB/s)\n  signer: {result.signer}\n"
            f"  root digest: sha256:{result.root_digest}"
        )
    return 0


def _profile(args: argparse.Namespace) -> int:
    from runtime import config as config_mod
    from runtime import recorder, weights

    telemetry.set_stream(sys.stderr)  # stdout says where the profile went
    cfg = config_mod.load(args.config, args.set)
    recordings = [recorder.from_profile(Path(p)) for p in args.merge]
    if args.container and not args.merge_only:
        if not (args.client_cert and args.client_key and args.ca):
            raise ConfigError(
                "--container needs --ca, --client-cert and --client-key",
                fix="give a client certificate the front allows, and the CA of its server "
                "certificate",
            )
        workload = recorder.load_workload(args.workload, cfg.model.served_name)
        client = (Path(args.ca), Path(args.client_cert), Path(args.client_key))
        recordings.append(
            recorder.record_container(
                Path(args.config),
                args.set,
                cfg.front.listen,
                workload,
                client,
                Path(f"{args.out}.events.jsonl"),
                args.concurrency,
            )
        )
    elif not args.merge_only:
        weights.verify_weights(cfg)  # the engine about to run loads these weights
        workload = recorder.load_workload(args.workload, cfg.model.served_name)
        recordings.append(recorder.record(cfg, workload, args.concurrency))
    merged = recorder.merge(recordings)
    if args.container:  # also with --merge-only: a refreshed container profile keeps them
        merged.names |= recorder.CONTAINER
    profile = recorder.to_profile(
        merged,
        f"harness {'container' if args.container else 'engine'} profile, device "
        f"{cfg.engine.device}, recorded by `harness profile`"
        + (f", merged with {len(args.merge)} other profile(s)" if args.merge else ""),
        container=args.container,
    )
    out = Path(args.out)
    out.write_text(json.dumps(profile, indent=2) + "\n")
    print(
        f"wrote {out}: {len(profile['syscalls'][0]['names'])} syscalls allowed, "
        f"{len(profile['syscalls']) - 2} socket rules"
        + (
            f"; refused although called: {', '.join(sorted(merged.denied_seen))}"
            if merged.denied_seen
            else ""
        )
    )
    return 0


def _seccomp_check(args: argparse.Namespace) -> int:
    from runtime.sandbox.seccomp import bpf, oci

    summary = bpf.summarise(oci.load_profile(Path(args.profile)))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for key, value in summary.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        print(f"{key.replace('_', ' ')}: {shown if shown != '' else '-'}")
    return 0


def _progress_bar(done: int, total: int, done_bytes: int) -> None:
    width = 30
    filled = width * done // total
    end = "\n" if done == total else ""
    print(
        f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} files, "
        f"{done_bytes / 1e6:.0f} MB",
        end=end,
        file=sys.stderr,
        flush=True,
    )


def _sign(args: argparse.Namespace) -> int:
    from runtime.integrity import signature

    model = Path(args.model_dir)
    target = Path(args.signature) if args.signature else model / "model.sig"
    if args.certificate_chain and not args.certificate:
        raise ConfigError("--certificate-chain needs --certificate (the signing certificate)")
    digest = signature.sign_model(
        model,
        Path(args.private_key),
        target,
        certificate=Path(args.certificate) if args.certificate else None,
        chain=tuple(Path(p) for p in args.certificate_chain or ()),
        shard_size=args.shard_size,
    )
    print(f"signed {model} -> {target}\n  root digest: sha256:{digest}")
    return 0


def _demo_init(args: argparse.Namespace) -> int:
    from runtime.demo import assets

    made = assets.ensure(Path(args.dir), force=args.force)
    for line in made:
        print(line, file=sys.stderr)
    print(Path(args.dir).resolve() / assets.CONFIG_NAME)
    return 0


def _demo_serve(args: argparse.Namespace) -> int:
    from runtime import launcher
    from runtime.demo import assets

    # Made in a child: building the model and tokenizer leaves threads behind, and harness
    # confines itself with Landlock only while it has a single thread (sandbox.front).
    made = subprocess.run(
        [sys.executable, "-m", "runtime", "demo", "init", "--dir", str(args.dir)],
        stdout=subprocess.DEVNULL,
        check=False,
    )
    if made.returncode != 0:
        return made.returncode
    return launcher.serve(
        Path(args.dir) / assets.CONFIG_NAME,
        args.set,
        on_ready=lambda cfg: print(assets.usage(Path(args.dir), cfg), file=sys.stderr, flush=True),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Hardened launcher: verifies, sandboxes and serves vLLM behind mTLS.",
    )
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="TOML configuration file")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY.PATH=VALUE",
            help="override one config value (TOML syntax), e.g. --set limits.max_tokens=32",
        )

    p = sub.add_parser("serve", help="verify, sandbox, start the engine and serve it over mTLS")
    with_config(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("check", help="validate the config and report the controls in force")
    with_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.set_defaults(func=_check)

    p = sub.add_parser("verify", help="check a model dir against its OMS signature (exit 3)")
    p.add_argument("model_dir")
    p.add_argument("--signature", required=True, help="OMS v1.0 bundle (model.sig)")
    trust = p.add_mutually_exclusive_group(required=True)
    trust.add_argument("--public-key", help="key method: the signer's PEM ECDSA public key")
    trust.add_argument(
        "--certificate-chain",
        nargs="+",
        metavar="PEM",
        help="certificate method: trusted root CA(s) and intermediates",
    )
    trust.add_argument(
        "--sigstore-identity",
        action="append",
        metavar="ID",
        help="sigstore method: an allowed signer identity; repeatable",
    )
    p.add_argument(
        "--identity",
        action="append",
        metavar="SAN",
        help="certificate method: an allowed signer SAN (email or URI); repeatable",
    )
    p.add_argument("--sigstore-issuer", metavar="URL", help="sigstore method: the OIDC issuer")
    p.add_argument(
        "--trust-config",
        metavar="FILE",
        help="sigstore method: the pinned trusted_root.json (no network is used)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable result on stdout")
    p.set_defaults(func=_verify)

    p = sub.add_parser("sign", help="sign a model dir in the OMS v1.0 format")
    p.add_argument("model_dir")
    p.add_argument("--private-key", required=True, help="PEM ECDSA P-256/384/521 private key")
    p.add_argument("--certificate", help="signing certificate (PEM); default: a bare key")
    p.add_argument(
        "--certificate-chain",
        nargs="+",
        metavar="PEM",
        help="intermediate/root certificates to include after the signing certificate",
    )
    p.add_argument("--signature", help="where to write the bundle (default MODEL_DIR/model.sig)")
    p.add_argument(
        "--shard-size",
        type=int,
        metavar="BYTES",
        help="sign shards of this size (OMS 'shards'): verification of a large "
        "file then uses every core",
    )
    p.set_defaults(func=_sign)

    _secrets_parser(sub)  # secrets fetch: the Vault init container

    p = sub.add_parser(
        "profile", help="record a seccomp profile of the real engine under a workload"
    )
    with_config(p)
    p.add_argument("--out", required=True, help="where to write the OCI seccomp profile")
    p.add_argument(
        "--workload",
        type=Path,
        help='JSON list of requests [{"path": ..., "body": {...}}]; default: completions, '
        "streamed chat, requests the engine rejects",
    )
    p.add_argument("--concurrency", type=int, default=4, help="parallel requests (default 4)")
    p.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="PROFILE",
        help="union this recorded profile into the result; repeatable",
    )
    p.add_argument(
        "--merge-only", action="store_true", help="only merge the --merge profiles, record none"
    )
    p.add_argument(
        "--container",
        action="store_true",
        help="record harness serve itself (front and engine): the container's profile for "
        "the kubelet; the workload goes through the front",
    )
    p.add_argument("--ca", help="--container: CA of the front's server certificate")
    p.add_argument("--client-cert", help="--container: a client certificate the front allows")
    p.add_argument("--client-key", help="--container: its private key")
    p.set_defaults(func=_profile)

    p = sub.add_parser("seccomp", help="seccomp profile tools")
    seccomp_sub = p.add_subparsers(dest="seccomp_command", required=True, metavar="ACTION")
    p = seccomp_sub.add_parser("check", help="validate and summarise an OCI seccomp profile")
    p.add_argument("profile")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=_seccomp_check)

    demo = sub.add_parser("demo", help="demo assets: tiny model, PKI, config")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    p = demo_sub.add_parser("init", help="create whatever is missing under --dir")
    p.add_argument("--dir", default=".demo")
    p.add_argument("--force", action="store_true", help="rebuild everything")
    p.set_defaults(func=_demo_init)
    p = demo_sub.add_parser("serve", help="init, then serve the demo in the foreground")
    p.add_argument("--dir", default=".demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.set_defaults(func=_demo_serve)
    return parser


def _secrets_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`harness secrets fetch`."""
    group = sub.add_parser("secrets", help="secrets tools (Vault init container)")
    actions = group.add_subparsers(dest="secrets_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "fetch",
        help="log in to Vault, write KV v2 secrets into an in-memory dir, revoke the token",
        description="Init-container mode: log in to Vault, read KV v2 secrets, write one\n"
        "file per secret (mode 0400) into an in-memory dir, revoke the token, exit.\n"
        "Exit 4 on any failure, with nothing new written (2 for malformed flags).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  harness secrets fetch --addr https://vault:8200 --ca-cert "
        "/vault/tls/ca.pem \\\n    --auth kubernetes --role inference --kv-mount secret \\\n"
        "    --secret tls.key=harness/front#key --secret otlp.json=harness/otlp \\\n"
        "    --out /vault/secrets",
    )
    p.add_argument("--addr", metavar="URL", help="Vault address (default: $VAULT_ADDR)")
    p.add_argument(
        "--ca-cert", metavar="PEM", help="CA that issued Vault's certificate ($VAULT_CACERT)"
    )
    p.add_argument(
        "--auth",
        choices=("kubernetes", "approle"),
        required=True,
        help="kubernetes: --role and the service-account JWT; approle: --role-id-file and "
        "--secret-id-file",
    )
    p.add_argument("--auth-mount", metavar="PATH", help="auth mount path (default: --auth)")
    p.add_argument("--role", help="kubernetes: the Vault role bound to this service account")
    p.add_argument(
        "--jwt-file",
        default=vault.DEFAULT_JWT_FILE,
        metavar="FILE",
        help=f"kubernetes: service-account token file (default {vault.DEFAULT_JWT_FILE})",
    )
    p.add_argument("--role-id-file", metavar="FILE", help="approle: file holding the role_id")
    p.add_argument("--secret-id-file", metavar="FILE", help="approle: file holding the secret_id")
    p.add_argument("--kv-mount", default="secret", metavar="PATH", help="KV v2 mount (secret)")
    p.add_argument(
        "--secret",
        action="append",
        required=True,
        metavar="NAME=PATH[#FIELD]",
        help="write file NAME from KV PATH: its FIELD, its only field, or (NAME ending in "
        ".json) every field as JSON; repeatable",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="in-memory dir (tmpfs) to fill")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per request (10)")
    p.add_argument(
        "--unsafe-allow-http",
        action="store_true",
        help="allow a plain http:// Vault (a local development server only)",
    )
    p.set_defaults(func=_secrets_fetch)


def _secrets_fetch(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(vault.FetchOptions)}
    given = {name: value for name, value in vars(args).items() if name in fields}
    options = vault.FetchOptions(**{**given, "secret": tuple(args.secret)})
    return vault.run(options, os.environ)


def _logging() -> None:
    # Library logs (uvicorn) go to stderr; stdout is reserved for JSON events.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _logging()
    func: Callable[[argparse.Namespace], int] = args.func
    serving = args.command == "serve" or getattr(args, "demo_command", None) == "serve"
    try:
        return func(args)
    except HarnessError as exc:
        print(exc.diagnostics(), file=sys.stderr)
        if serving:
            telemetry.emit(
                "shutdown",
                "failed",
                exit_code=exc.exit_code,
                error=type(exc).__name__,
                message=exc.message,
            )
        return exc.exit_code
    except BaseException as exc:
        from runtime.launcher import StopRequested

        if isinstance(exc, StopRequested):
            telemetry.emit("shutdown", "ok", exit_code=0, reason=f"{exc} before serving")
            return 0
        if isinstance(exc, SystemExit | KeyboardInterrupt):
            raise
        traceback.print_exc()
        print(
            "harness: internal error: this is a bug in harness, not in your configuration; "
            "please report it with the traceback above",
            file=sys.stderr,
        )
        return 1
