"""Talk to a harness front with the official `openai` client over mTLS.

python examples/openai_client.py --dir .demo
"""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

import httpx
import openai


def client(base_url: str, ca: Path, cert: Path, key: Path) -> openai.OpenAI:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key="unused",  # identity is the client certificate, not a key
        http_client=httpx.Client(verify=ctx),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=".demo", help="demo folder (pki/ inside)")
    parser.add_argument("--url", default="https://127.0.0.1:8443")
    parser.add_argument("--model", default="demo")
    args = parser.parse_args()
    pki = Path(args.dir) / "pki"
    api = client(args.url, pki / "ca.pem", pki / "client.pem", pki / "client-key.pem")

    done = api.completions.create(model=args.model, prompt="hello world", max_tokens=16)
    print("completion:", repr(done.choices[0].text))

    print("streamed chat:", end=" ", flush=True)
    stream = api.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=16,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(repr(chunk.choices[0].delta.content), end=" ", flush=True)
    print()


if __name__ == "__main__":
    main()
