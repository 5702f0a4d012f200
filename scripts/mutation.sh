#!/usr/bin/env bash
# Mutation testing of the modules that decide safety: task ids (dfdaemon/ids.py), the child's check of a
# parent's piece (dfdaemon/download/parents.py), the cache's references (dfdaemon/storage/manager.py) and GC
# planning (dfdaemon/gc/plan.py), each against its unit tests. Configuration: [tool.mutmut] in pyproject.toml;
# mutmut works on copies in ./mutants/ (ignored by git). Needs the "mutation" extra (pip install -e '.[mutation]').
#
# Usage: scripts/mutation.sh [module[.function] ...]   e.g. scripts/mutation.sh ids gc.plan
#   (no argument: all four modules). A function narrows a run to its mutants, named as mutmut names them:
#   download.parents.x_check_place for a function, 'storage.manager.xǁStorageǁevict' for a method.
#   Survivors are listed at the end; `mutmut show NAME` prints one.
# Equivalent mutants, which no test can kill, are listed in tests/MUTANTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's virtual environment first (run from anywhere), then a mutmut on PATH.
MUTMUT="${MUTMUT:-.venv/bin/mutmut}"
[ -x "$MUTMUT" ] || MUTMUT=mutmut
modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=(ids download.parents storage.manager gc.plan)
patterns=()
for module in "${modules[@]}"; do
    patterns+=("dfdaemon.${module}*")
done
"$MUTMUT" run "${patterns[@]}" || true
"$MUTMUT" results
