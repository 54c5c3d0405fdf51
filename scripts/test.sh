#!/usr/bin/env bash
# Install everything the test suite needs (Debian packages, a virtualenv with the
# project and its test extras) and run the whole suite. Extra arguments go to pytest.
# Used as-is by CI (.ci/run) and quoted in the README.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(skopeo docker-registry podman buildah docker.io containerd wrk uidmap)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "== apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Azurite (the Azure Blob emulator) comes from npm, into a project-local folder.
AZURITE_VERSION=3.35.0
if [ ! -x .tools/node_modules/.bin/azurite-blob ]; then
  echo "== npm install azurite@$AZURITE_VERSION"
  mkdir -p .tools
  npm install --prefix .tools --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION" >/dev/null
fi
export PATH="$PWD/.tools/node_modules/.bin:$PATH"

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "== pip install -e .[test]"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'

echo "== ruff"
"$VENV/bin/ruff" check .

echo "== pytest"
export PATH="$PWD/$VENV/bin:$PATH"
exec "$VENV/bin/python" -m pytest "$@"
