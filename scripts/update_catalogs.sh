#!/usr/bin/env bash
# Re-extract every translatable string from bot/templates and merge it into each catalog: new strings
# arrive empty, changed ones marked fuzzy. Translate those, then run tests/test_templates.py, which fails
# while any catalog misses or leaves a string untranslated. (docs/guidance.md, "Languages and catalogs")
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VIRTUAL_ENV:-.venv}/bin"
"$BIN/pybabel" extract -F babel.cfg --no-location --sort-output --project recoverybot \
  -o bot/templates/locale/messages.pot bot/templates
"$BIN/pybabel" update -i bot/templates/locale/messages.pot -d bot/templates/locale --no-wrap --ignore-obsolete
