#!/bin/sh
# Builds page/realtime-js.js: the stock @supabase/realtime-js from npm as one browser ES module. It runs on the
# deploying machine (a worker fetches nothing, and the page loads nothing from a CDN). `make run` calls it.
# Usage: [DENO=/path/to/deno] sh examples/functions/realtime-demo/build.sh
set -eu
here=$(dirname "$0")
"${DENO:-deno}" bundle --quiet --no-lock --no-config --platform=browser --format=esm --minify \
  --output="$here/page/realtime-js.js" "$here/client.ts"
