#!/bin/sh
# Print the path of a Python >= 3.12 on this machine (PATH, pyenv, common prefixes), preferring
# 3.12 (the GPU machine's version) so CPU tests and GPU runs share a Python. Set MESHLM_PYTHON
# to override.
minor() { "$1" -c 'import sys; print(sys.version_info[1] if sys.version_info[0] == 3 else 0)' 2>/dev/null; }
candidates() {
  for name in python3.12 python3.13 python3.14 python3 python; do command -v "$name" 2>/dev/null; done
  for root in "${PYENV_ROOT:-$HOME/.pyenv}" /root/.pyenv /usr/local /opt/python /opt/conda; do
    ls -d "$root"/versions/3.*/bin/python3 "$root"/bin/python3.1[2-9] 2>/dev/null | sort -V
  done
  command -v uv >/dev/null 2>&1 && uv python find '>=3.12' 2>/dev/null
}
if [ -n "${MESHLM_PYTHON:-}" ]; then echo "$MESHLM_PYTHON"; exit 0; fi
best=""; for p in $(candidates); do
  m=$(minor "$p") || continue
  [ -n "$m" ] || continue
  if [ "$m" -eq 12 ]; then echo "$p"; exit 0; fi
  if [ "$m" -gt 12 ] && [ -z "$best" ]; then best=$p; fi
done
if [ -n "$best" ]; then echo "$best"; exit 0; fi
echo "error: no Python >= 3.12 found (looked on PATH, in pyenv and common prefixes); set MESHLM_PYTHON=/path/to/python3" >&2
exit 1
