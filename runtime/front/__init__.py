"""The front: the only network listener. mTLS, client identity, route allowlist, proxy."""
