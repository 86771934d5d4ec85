# shellcheck shell=bash
# Make this checkout runnable on a lent GPU machine with no network, without pip-installing
# the project. Source it (bash) from the repository root, after carrying gpu_wheels/ along:
#
#     source scripts/gpu_env.sh
#
# It
#   1. installs every wheel in gpu_wheels/ (made here by scripts/gpu_wheels.sh) with
#      `pip install --no-index --no-deps --target /tmp/irt-pkgs`, skipping wheels already there;
#   2. builds /tmp/irt-src/imageragturbo, a tree of symlinks: each entry of imageragturbo/ links
#      to the checkout's, and training, retriever, export, client link to the top-level folders
#      (the mapping pyproject.toml gives setuptools), so every `imageragturbo.*` module imports
#      from this checkout; paths computed from Path(__file__).resolve() (the shipped weights,
#      model_repository/) land back in the checkout;
#   3. exports PYTHONPATH=/tmp/irt-src:/tmp/irt-pkgs:$PYTHONPATH and PYTHONSAFEPATH=1, and puts
#      an `imageragturbo` command (python -m imageragturbo.commands "$@") first on PATH, so
#      subprocesses see it too. PYTHONSAFEPATH=1 (Python >= 3.11) keeps `python -m/-c` from
#      putting the current folder first on sys.path: from the repository root, ./imageragturbo
#      (which has no training/, retriever/, export/, client/) would otherwise shadow the tree.
#      (So `python some/script.py` no longer sees its own folder either; use python -m.)
# Needs: bash, a Python >= 3.11 (IRT_PYTHON, default python3; pip optional: without it the
# wheels are unpacked), torch & co. preinstalled.
# Overrides: IRT_WHEELS (wheel folder), IRT_PKGS (/tmp/irt-pkgs), IRT_SRC (/tmp/irt-src).
# Sourced, so no `set -e`: it reports and returns non-zero instead.

_irt_env() {
    local root py wheels pkgs src whl base nv entry name
    local -a todo=()
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
    py=${IRT_PYTHON:-$(command -v python3 || command -v python)}
    wheels=${IRT_WHEELS:-$root/gpu_wheels}
    pkgs=${IRT_PKGS:-/tmp/irt-pkgs}
    src=${IRT_SRC:-/tmp/irt-src}
    if [ -z "$py" ]; then
        echo "gpu_env: no python3 on PATH (set IRT_PYTHON)" >&2
        return 1
    fi

    # 1. wheels -> $pkgs (a wheel counts as installed when its NAME-VERSION.dist-info is there)
    mkdir -p "$pkgs" || return 1
    if [ -d "$wheels" ]; then
        for whl in "$wheels"/*.whl; do
            [ -e "$whl" ] || continue
            base=${whl##*/}
            nv=$(printf '%s' "$base" | cut -d- -f1-2)
            [ -d "$pkgs/$nv.dist-info" ] || todo+=("$whl")
        done
        if [ ${#todo[@]} -gt 0 ]; then
            echo "gpu_env: installing ${#todo[@]} wheel(s) into $pkgs"
            if "$py" -m pip --version >/dev/null 2>&1; then
                "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps \
                    --upgrade --target "$pkgs" "${todo[@]}" || {
                    echo "gpu_env: pip install failed" >&2
                    return 1
                }
            else
                # No pip: these wheels have no .data/ parts, so unpacking one installs it.
                echo "gpu_env: no pip for $py; unpacking the wheels instead" >&2
                for whl in "${todo[@]}"; do
                    "$py" -m zipfile -e "$whl" "$pkgs" || return 1
                done
            fi
        fi
    else
        echo "gpu_env: no wheel folder $wheels (carry gpu_wheels/; see scripts/gpu_wheels.sh)" >&2
    fi

    # 2. the package as a tree of symlinks into this checkout, rebuilt each time
    rm -rf "$src/imageragturbo" && mkdir -p "$src/imageragturbo" "$src/bin" || return 1
    for entry in "$root"/imageragturbo/*; do
        name=${entry##*/}
        [ "$name" = "__pycache__" ] && continue
        ln -s "$entry" "$src/imageragturbo/$name" || return 1
    done
    for name in training retriever export client; do
        if [ -d "$root/$name" ]; then
            rm -rf "$src/imageragturbo/$name"
            ln -s "$root/$name" "$src/imageragturbo/$name" || return 1
        fi
    done

    # 3. the environment and the command
    cat > "$src/bin/imageragturbo" <<EOF
#!/bin/sh
exec "$py" -m imageragturbo.commands "\$@"
EOF
    chmod +x "$src/bin/imageragturbo"
    case ":${PYTHONPATH:-}:" in
        *":$src:$pkgs:"*) ;;
        *) export PYTHONPATH="$src:$pkgs${PYTHONPATH:+:$PYTHONPATH}" ;;
    esac
    export PYTHONSAFEPATH=1
    case ":$PATH:" in
        *":$src/bin:"*) ;;
        *) export PATH="$src/bin:$PATH" ;;
    esac
    export IRT_REPO="$root"

    # A quick look: where the package and the weights resolve, and what is missing.
    "$py" - <<'EOF'
import importlib.util, sys
from pathlib import Path
import imageragturbo
# The paths imageragturbo.model.family and .serving.repository compute, without importing torch.
fam = Path(importlib.util.find_spec("imageragturbo.model.family").origin).resolve()
rep = Path(importlib.util.find_spec("imageragturbo.serving.repository").origin).resolve()
weights, repo = fam.parent.parent / "weights" / "tiny-shapes", rep.parents[2] / "model_repository"
ok = lambda p: "ok" if p.is_dir() else "MISSING"
print(f"gpu_env: python {sys.version.split()[0]}; imageragturbo in {imageragturbo.__path__[0]}; "
      f"{weights} {ok(weights)}; {repo} {ok(repo)}")
for part in ("training", "retriever", "export", "client"):
    if importlib.util.find_spec(f"imageragturbo.{part}") is None:
        print(f"gpu_env: imageragturbo.{part} NOT importable", file=sys.stderr)
        sys.exit(1)
need = ["torch", "torchvision", "numpy", "PIL", "scipy", "matplotlib", "tqdm", "transformers",
        "diffusers", "open_clip", "peft", "accelerate", "safetensors", "onnx", "onnxruntime",
        "hnswlib", "tritonclient"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    print("gpu_env: not importable here:", " ".join(missing))
EOF
}

_irt_env
_irt_rc=$?
unset -f _irt_env
if [ "$_irt_rc" -ne 0 ]; then
    echo "gpu_env: FAILED (rc $_irt_rc)" >&2
fi
# shellcheck disable=SC2317  # `return` when sourced, `exit` when run by mistake
return "$_irt_rc" 2>/dev/null || exit "$_irt_rc"
