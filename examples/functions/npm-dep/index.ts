// An npm dependency. The worker has no network and no module cache: `mbworker deploy` resolves the package on
// the deploying machine and ships it (node_modules + deno.lock) with the function.
// GET /npm-dep?d=2%20days → {"ms": 172800000, "pretty": "2d"}
import ms from "npm:ms@2.1.3";

Deno.serve((req: Request) => {
  const d = new URL(req.url).searchParams.get("d") ?? "1h";
  const value = ms(d);
  return Response.json({ ms: value, pretty: typeof value === "number" ? ms(value) : null });
});
