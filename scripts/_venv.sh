# Sourced by the bash scripts in scripts/: run with the project's virtualenv from a fresh
# shell. An active virtualenv ($VIRTUAL_ENV) is used as it is; otherwise .venv, created
# on first use (or refreshed after pyproject.toml changed) by `make`, as `make test` does.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    make -s -C "$_root" .venv/.installed
    export PATH="$_root/.venv/bin:$PATH"
fi
unset _root
