#!/usr/bin/env bash
# Regenerate the lock (requirements/lock.txt) from pyproject.toml, then the conda envs
# (envs/*.yaml) from the lock and envs/*.in. Run from any folder, in a venv with pip-tools:
#   pip install pip-tools && bash requirements/lock.sh
# Resolved for Python 3.11 on Linux x86_64 with the CPU build of torch (requirements/torch.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
compile() {  # pip-compile with the options every file here is made with; the CPU torch build
    # resolves as 2.13.0+cpu where it is on disk: the lock names the public version
    python -m piptools compile --quiet --strip-extras --allow-unsafe --no-emit-index-url \
        --no-emit-find-links --no-emit-trusted-host "$@"
}
compile --extra test -c requirements/torch.txt --output-file requirements/lock.txt pyproject.toml
sed -i -E 's/^torch==([0-9.]+)\+[a-z0-9]+/torch==\1/' requirements/lock.txt
for spec in envs/*.in; do
    closure=$(mktemp)
    compile --no-annotate --no-header -c requirements/lock.txt --output-file "$closure" "$spec"
    python requirements/make_env.py "$spec" "$closure"
    rm -f "$closure"
done
echo "requirements/lock.txt and envs/*.yaml regenerated"
