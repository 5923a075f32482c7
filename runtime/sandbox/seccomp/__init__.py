"""Seccomp for the engine: OCI profiles (the format Docker, podman and the kubelet read),
compiled with libseccomp (pyseccomp) and installed in stage 2 right before exec.

The kernel holds the allowlist. Everything else goes to a user-space supervisor in harness
(SECCOMP_RET_USER_NOTIF), which answers EPERM and emits a `seccomp_violation` event naming the
syscall and pid (`enforce`), or lets it through and reports it (`complain`). If the supervisor
dies, notified calls fail with ENOSYS: closed, not open. `kill` needs no supervisor: the kernel
kills the process. What each layer reports, and why: docs/sandbox.md.

One module per phase:
- `oci.py`: parse and validate a profile (pure, no libseccomp);
- `policy.py`: harness's own rules on top of any profile (pure, no libseccomp);
- `bpf.py`: compile a profile and those rules with libseccomp into the BPF stage 2 loads;
- `configured.py`: the engine's profile as configured, checked at startup and described;
- `notify.py`: the supervisor that answers the filter's notifications.
Importing this package imports none of them: stage 2 and the pure parts stay free of libseccomp.
"""
