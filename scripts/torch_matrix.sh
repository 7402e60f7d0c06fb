#!/usr/bin/env bash
# The torch version matrix: run lkconv's whole test suite again under another torch release,
# in its own virtual environment, next to the CI version that scripts/setup_and_test.sh installs.
#
#   bash scripts/torch_matrix.sh [TORCH_VERSION ...]      default: 2.11.0 (the GPU box's torch)
#
# For each version: a venv in .venv-torch<version>/ (reused if present), `pip install torch==<version>`
# (a CUDA build from PyPI: it brings the triton release that torch was built with, so the Triton
# kernels are interpreted and compiled with that triton too), lkconv editable with its test extras,
# the torchvision that matches (for timm), and then:
#   1. `python -m lkconv info`
#   2. the CUDA extension built against *this* torch's headers with nvcc, when nvcc is on PATH — in a
#      copy of the tree (.venv-torch<version>/src), so the main checkout's lkconv/_C*.so is untouched
#   3. `python -m pytest` on that copy (GPU tests skip cleanly without a GPU)
#
# Exit status: 0 all versions passed; 1 a test or build failed (CI fails); 3 a version could not be
# installed (no network / no such wheel / pip ran past 25 min) — reported as NOT RUN, never as passed.
# Env: LKCONV_MATRIX_STRICT=1 turns "could not install" into a failure; PYTEST_ARGS adds pytest args.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(2.11.0)

# what goes with each torch release: torchvision (timm imports it; left to pip, which picks the release
# built for this torch), and for torch 2.11, which ships triton 3.6, numpy < 2.4 (that triton's
# interpreter calls int() on 1-element arrays, which numpy 2.4 refuses; lkconv's triton backend then
# reports itself unavailable under TRITON_INTERPRET=1; triton 3.7.1 of torch 2.12.1 is fixed)
pins_for() {
    case "$1" in
        2.11.*) echo "torchvision numpy<2.4" ;;
        *) echo "torchvision" ;;
    esac
}

status=0
summary=()
# the copies below have no .git: tell `lkconv info` / the benchmarks which commit they are
LKCONV_GIT_COMMIT="$(git rev-parse --short=12 HEAD 2>/dev/null)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
export LKCONV_GIT_COMMIT
for v in "${versions[@]}"; do
    printf '\n=== torch %s (%s)\n' "$v" "$(date -u +%H:%M:%S)"
    venv="$root/.venv-torch$v"
    py="$venv/bin/python"
    log="$venv.install.log"
    if [ ! -x "$py" ]; then
        python -m venv "$venv" || { summary+=("torch $v: FAILED (python -m venv)"); status=1; continue; }
    fi
    # shellcheck disable=SC2207
    pkgs=("torch==$v" $(pins_for "$v"))
    # pip --isolated: PyPI only, without this machine's pip configuration -- its constraint caps torch
    # at the CI version, and its local CPU-only wheel of a release would win over PyPI's CUDA build
    # ("2.13.0+cpu" sorts above "2.13.0"), beside which PyPI's torchvision does not import
    if ! timeout 1500 "$py" -m pip --isolated install -q "${pkgs[@]}" >"$log" 2>&1; then
        tail -5 "$log"
        summary+=("torch $v: NOT RUN (pip could not install ${pkgs[*]}; see $log)")
        [ "$status" -eq 0 ] && status=3
        continue
    fi
    # the tests run on a copy of the tree, so this venv's build of lkconv._C stays out of the checkout
    src="$venv/src"
    rm -rf "$src" && mkdir -p "$src"
    git ls-files -z | xargs -0 cp --parents -t "$src"
    if ! (cd "$src" && timeout 900 "$py" -m pip --isolated install -q -e ".[test]" "${pkgs[@]}" timm) >>"$log" 2>&1; then
        tail -5 "$log"
        summary+=("torch $v: NOT RUN (pip could not install lkconv's test extras; see $log)")
        [ "$status" -eq 0 ] && status=3
        continue
    fi
    got=$("$py" -c "import torch; print(torch.__version__)")
    case "$got" in
        "$v"|"$v"+*) ;;
        *) summary+=("torch $v: FAILED (asked for torch $v, the venv has $got)"); status=1; continue ;;
    esac

    ( cd "$src" && "$py" -m lkconv info ) || { summary+=("torch $v: FAILED (python -m lkconv info)"); status=1; continue; }

    built="CUDA extension not built (no nvcc)"
    if ! "$py" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
        built="CUDA extension not built (torch $got is a CPU build)"
    elif [ "${LKCONV_SKIP_CUDA_BUILD:-0}" != "1" ] && command -v nvcc >/dev/null 2>&1; then
        if (cd "$src" && PATH="$venv/bin:$PATH" bash .ci/build_cuda.sh); then
            built="CUDA extension built and loaded"
        else
            summary+=("torch $v: FAILED (CUDA extension build against torch $got)"); status=1; continue
        fi
    fi

    # shellcheck disable=SC2086
    if (cd "$src" && "$py" -m pytest -q -ra -p no:cacheprovider ${PYTEST_ARGS:-}); then
        summary+=("torch $v ($got): passed; $built")
    else
        summary+=("torch $v ($got): FAILED (pytest)"); status=1
    fi
done

printf '\n=== torch version matrix\n'
printf '  %s\n' "${summary[@]}"
if [ "$status" -eq 3 ] && [ "${LKCONV_MATRIX_STRICT:-0}" = "1" ]; then status=1; fi
exit "$status"
