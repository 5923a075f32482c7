#!/usr/bin/env bash
# Run here, where PyPI and Debian's mirror are reachable, before a run on a GPU machine that
# has neither: fills .device/ (git-ignored) with what that machine lacks, for device_run.sh.
#  - .device/wheels: harness's dependencies (and the openai client the tests use) for CPython
#    3.12 on x86-64, the versions pip resolves today, minus the packages that machine's torch
#    environment already holds (the list below, from its image);
#  - .device/debs: Debian's libseccomp2, unpacked there only where the machine lacks it.
# device_run.sh installs the wheels into that machine's torch environment (replacing the
# versions of the few it already has): use it on a machine or environment you can throw away.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .device/wheels .device/debs
mkdir -p .device/wheels .device/debs

python3 - >.device/requirements.txt <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"]))
print(next(r for r in project["optional-dependencies"]["test"] if r.startswith("openai")))
PY
platforms=()
for tag in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
           manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .device/wheels -r .device/requirements.txt

# Already in the GPU machine's torch environment (torch, transformers and tokenizers need
# them): keep its versions rather than carry a second one.
present="numpy tokenizers safetensors huggingface_hub hf_xet fsspec filelock packaging pyyaml
requests urllib3 certifi idna charset_normalizer rich pygments markdown_it_py mdurl tqdm psutil
click"
for name in $present; do
  rm -f .device/wheels/"$name"-[0-9]*.whl
done
(cd .device/debs && apt-get download libseccomp2 >/dev/null)
du -sh .device
ls .device/wheels .device/debs
