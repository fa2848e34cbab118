#!/usr/bin/env bash
# Install medae into a virtual environment, offline-friendly and GPU-aware.
#
#   scripts/install.sh [--dev] [--venv DIR]      (default DIR: .venv)
#
# Order matters: torch is installed (or kept) BEFORE medae, because medae only
# asks for "torch>=2.2" and pip would otherwise pull the multi-GB CUDA build onto
# a CPU machine. The rules:
#   * a torch already importable in the environment is kept (a GPU site's CUDA
#     build is never replaced);
#   * on a machine with an NVIDIA GPU (nvidia-smi lists one) pip's default
#     torch build (CUDA) is installed;
#   * otherwise the CPU build: a local wheel from pip's find-links if there is
#     one, else from the PyTorch CPU index.
# Set MEDAE_TORCH_VERSION to pin another torch version.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv extras=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) extras="[dev]" ;;
    --venv) venv="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)
torch_version=${MEDAE_TORCH_VERSION:-2.13.0}

if "$py" -c "import torch" 2>/dev/null; then
  echo "medae install: keeping installed torch $("$py" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "medae install: NVIDIA GPU found, installing CUDA torch==$torch_version"
  "${pip[@]}" "torch==$torch_version"
else
  echo "medae install: no GPU, installing CPU torch==$torch_version"
  # A local CPU wheel (pip's find-links) first; its dependencies then come from
  # the normal index. Without one, the PyTorch CPU index provides the wheel.
  if "${pip[@]}" --no-index --no-deps "torch==$torch_version" 2>/dev/null; then
    "${pip[@]}" "torch==$torch_version"
  else
    "${pip[@]}" "torch==$torch_version" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi

"${pip[@]}" -e ".$extras"
echo "medae install: done ($("$py" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
