"""OpenSSF model signing (OMS v1.0) bundles. Pure: bytes and keys in, facts or an error out.

A bundle is a Sigstore bundle (v0.2 or v0.3 JSON) whose DSSE envelope carries an in-toto
Statement v1 with predicate https://model_signing/signature/v1.0: one SHA-256 digest per file
(or per shard), and a subject digest over them. Verification, in order:
  1. parse the bundle strictly (one signature, known media and payload types) and check that
     its verification material is what the configured method verifies (envelope: parse_bundle,
     check_method);
  2. check the signature over the DSSE PAE with the trusted key (signers, method-specific: a key
     named by its hint or carried as rawBytes, or a certificate chained to a configured root,
     for code signing, valid at signing time and now, carrying an allowed identity; or
     Sigstore keyless, checked by sigstore-python against a pinned trust root);
  3. parse the statement strictly (safe resource names, no duplicates, sha256 hex), and
  4. recompute the subject digest from the resources (both manifest: parse_statement);
then the caller checks the file sizes against a shards manifest before hashing (check_sizes)
and compares the resources with the files it hashed (compare_manifest), both in manifest.
`harness sign` writes the statement and its bundle with signing (statement_for, sign_with_key).
What the phases share (the error, its remedies, the methods) is in common.
"""

from runtime.integrity.oms.common import TAMPERED, Method
from runtime.integrity.oms.envelope import (
    BUNDLE_MEDIA_TYPES,
    PAYLOAD_TYPE,
    Bundle,
    check_method,
    pae,
    parse_bundle,
)
from runtime.integrity.oms.manifest import (
    MAX_SHARD_SIZE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    Statement,
    check_sizes,
    compare_manifest,
    ordered,
    parse_statement,
    root_digest,
)
from runtime.integrity.oms.signers import (
    KeyMatch,
    key_hint,
    load_public_key,
    load_sigstore_root,
    verify_with_certificates,
    verify_with_key,
    verify_with_sigstore,
)
from runtime.integrity.oms.signing import sign_with_key, statement_for

__all__ = [
    "BUNDLE_MEDIA_TYPES",
    "MAX_SHARD_SIZE",
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "TAMPERED",
    "Bundle",
    "KeyMatch",
    "Method",
    "Statement",
    "check_method",
    "check_sizes",
    "compare_manifest",
    "key_hint",
    "load_public_key",
    "load_sigstore_root",
    "ordered",
    "pae",
    "parse_bundle",
    "parse_statement",
    "root_digest",
    "sign_with_key",
    "statement_for",
    "verify_with_certificates",
    "verify_with_key",
    "verify_with_sigstore",
]
