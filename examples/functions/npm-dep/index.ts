// An npm dependency. The worker has no network and no module cache, so deploy the bundled form:
//   deno bundle examples/functions/npm-dep/index.ts -o bundle.js     (the deploy CLI does this for you)
// GET /npm-dep?d=2%20days → {"ms": 172800000, "pretty": "2d"}
import ms from "npm:ms@2.1.3";

Deno.serve((req: Request) => {
  const d = new URL(req.url).searchParams.get("d") ?? "1h";
  const value = ms(d);
  return Response.json({ ms: value, pretty: typeof value === "number" ? ms(value) : null });
});
