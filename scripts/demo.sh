#!/usr/bin/env bash
# README command 1: install what is missing, build and install the extension, run the demo.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"
bash "$here/setup.sh"
cd "$here/.."
echo "==> building and installing the extension"
cargo pgrx install --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
python3 "$here/demo.py"
