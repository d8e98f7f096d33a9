#!/usr/bin/env bash
# Creates the MONAI Label server environment: a virtual environment with monailabel 0.8.5, its
# serving requirements (requirements.txt), and echocare from this checkout with its own
# requirements, under constraints.txt (the project's CPU torch, numpy < 2, pydicom < 3).
#
#   bash apps/monailabel/setup_env.sh [ENV_DIR]      (default: .monailabel_venv in the repository root)
#
# Idempotent: an environment completed with the same requirement files is left as it is; one left
# incomplete (an interrupted run) or made with other files is completed by pip. PYTHON picks the
# interpreter that creates the environment (default python3).
set -euo pipefail

app_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$app_dir/../.." && pwd)
env_dir=${1:-$repo/.monailabel_venv}
python=${PYTHON:-python3}
stamp="$env_dir/.echocare-monailabel"

# What the environment is made from: when none of these change, there is nothing to do.
wanted=$(cat "$app_dir/requirements.txt" "$app_dir/constraints.txt" "$repo/setup.cfg" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && [ -x "$env_dir/bin/monailabel" ]; then
    echo "$env_dir: complete (activate with: source $env_dir/bin/activate)"
    exit 0
fi

start=$SECONDS
rm -f "$stamp"
[ -x "$env_dir/bin/python" ] || "$python" -m venv "$env_dir"
# --no-compile: byte-compiling every module of torch, itk, mlflow... costs more than the modules
# the server imports compile on first use.
pip=("$env_dir/bin/python" -m pip install --disable-pip-version-check --progress-bar off --no-compile)
"${pip[@]}" --no-deps monailabel==0.8.5
"${pip[@]}" -c "$app_dir/constraints.txt" -r "$app_dir/requirements.txt" -e "$repo"
# The server must import; echocare must import its readers and networks there.
"$env_dir/bin/python" -c "import monailabel.app, echocare.data, echocare.networks, itk" >/dev/null
echo "$wanted" > "$stamp"
echo "$env_dir: created in $((SECONDS - start)) s (activate with: source $env_dir/bin/activate)"
