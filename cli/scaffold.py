"""`mbworker functions new NAME`: a function folder as `supabase functions new` makes one, ready to deploy.

Files: `index.ts` (a `Deno.serve` handler with a typed request), `deno.json` (the per-function import map
Supabase recommends) and a `function.toml` whose settings are all commented out at their defaults. Nothing in
them needs the network: the one remote import is the type-only edge-runtime reference, which deploys stub out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mbworker.worker.deployments.manifest import ManifestError, validate_slug
from mbworker.worker.errors import ConfigError

DEFAULT_DIR = Path("supabase") / "functions"

INDEX_TS = """\
// Setup type definitions for built-in Supabase Runtime APIs
import "jsr:@supabase/functions-js/edge-runtime.d.ts";

interface Greeting {
  name?: string;
}

console.log("Hello from Functions!");

Deno.serve(async (req: Request): Promise<Response> => {
  const url = new URL(req.url);
  let name = url.searchParams.get("name") ?? "world";
  if (req.method === "POST") {
    try {
      const body: Greeting = await req.json();
      if (typeof body.name === "string") name = body.name;
    } catch {
      return Response.json({ error: "the body must be JSON, e.g. {\\"name\\": \\"Functions\\"}" }, { status: 400 });
    }
  }
  return Response.json({ message: `Hello ${name}!` });
});

/* To invoke:

  1. Run `mbworker functions serve` (or `mbworker dev`) in the project folder.
  2. Make an HTTP request (the anon key is printed at start, and kept in .mbworker/secrets/keys.env):

  curl -i --location --request POST 'http://127.0.0.1:8000/functions/v1/{slug}' \\
    --header "Authorization: Bearer $ANON_KEY" \\
    --header 'Content-Type: application/json' \\
    --data '{"name":"Functions"}'

*/
"""

DENO_JSON = """\
{
  "imports": {}
}
"""

FUNCTION_TOML = """\
# Settings of the `{slug}` function; the values shown are the defaults. Supabase's supabase/config.toml
# [functions.{slug}] table is read too (this file wins).

# verify_jwt = true           # the JWT gate: requests need `Authorization: Bearer <anon or user JWT>`
# entrypoint = "index.ts"
# static_files = ["assets/*"] # files the function reads at run time, shipped with it

# [limits]
# memory_mb = 256
# cpu_time_ms = 2000
# request_idle_timeout_s = 150
# requests_per_second = 50    # over it: 429 RATE_LIMIT_EXCEEDED

# [net]                       # outbound: the public internet by default, never private addresses
# allow = ["api.example.com:443"]

# [env]                       # secrets: better in supabase/functions/.env or `mbworker deploy --env-file`
# API_KEY = "..."

# [cache]                     # results of GET/HEAD kept as Cache-Control allows, or for this long
# ttl = "30s"
"""


def add_new_command(fsub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = fsub.add_parser("new", help="create a function folder (index.ts, deno.json, function.toml)")
    p.add_argument("name", help="the function's name (its URL slug)")
    p.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help="where function folders live (default supabase/functions)"
    )
    p.set_defaults(func=cmd_new)


def create_function(root: Path, slug: str) -> Path:
    """Write the three files under `root/slug`. Refuses a name that is not a slug or a folder that exists."""
    try:
        validate_slug(slug)
    except ManifestError as exc:
        raise ConfigError(str(exc)) from exc
    folder = root / slug
    if folder.exists():
        raise ConfigError(f"{folder} already exists: pick another name or delete it first")
    folder.mkdir(parents=True)
    (folder / "index.ts").write_text(INDEX_TS.replace("{slug}", slug))
    (folder / "deno.json").write_text(DENO_JSON)
    (folder / "function.toml").write_text(FUNCTION_TOML.format(slug=slug))
    return folder


def cmd_new(args: argparse.Namespace) -> int:
    folder = create_function(args.dir, args.name)
    from mbworker.cli.output import program

    print(f"Created function {args.name} in {folder}")
    print(f"  Serve it  : {program()} functions serve {args.dir} --watch")
    print(f"  Deploy it : {program()} deploy {folder}")
    return 0
