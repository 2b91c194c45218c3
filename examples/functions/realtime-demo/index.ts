// Serves the realtime demo page and its realtime-js browser bundle (both deployed as static files).
//   GET /functions/v1/realtime-demo                 → the page, with the anon key and realtime URL filled in
//   GET /functions/v1/realtime-demo/realtime-js.js  → page/realtime-js.js (made by build.sh before deploying)
// Open the page in two tabs: each sees the other in the presence list, its cursor, and its chat messages.

const page = await Deno.readTextFile(new URL("./page/index.html", import.meta.url));
// Missing when build.sh did not run (e.g. no npm registry on the deploying machine): say so instead of a 404.
const bundle: string | null = await Deno.readTextFile(new URL("./page/realtime-js.js", import.meta.url)).catch(
  () => null,
);

/** What the page needs to connect: the public anon key and the realtime endpoint of this project. */
function pageConfig(req: Request) {
  // SUPABASE_URL is the project's public URL (the worker's own listener unless `public_url` is set).
  const base = (Deno.env.get("SUPABASE_URL") ?? new URL(req.url).origin).replace(/\/+$/, "");
  return {
    anonKey: Deno.env.get("SUPABASE_ANON_KEY") ?? "",
    realtimeUrl: base.replace(/^http/, "ws") + "/realtime/v1",
    bundleReady: bundle !== null,
  };
}

function renderPage(req: Request): string {
  // `<` escaped so no value can close the <script> element it sits in.
  const json = JSON.stringify(pageConfig(req)).replaceAll("<", "\\u003c");
  return page.replace("__DEMO_CONFIG__", () => json); // a function: no `$&` patterns
}

Deno.serve((req: Request) => {
  if (req.method !== "GET" && req.method !== "HEAD") {
    return Response.json({ error: "method not allowed" }, { status: 405, headers: { allow: "GET, HEAD" } });
  }
  // The path the function sees is /<slug>[/rest]; whatever the slug is, only the rest matters here.
  const rest = new URL(req.url).pathname.replace(/^\/[^/]+/, "");
  if (rest === "" || rest === "/" || rest === "/index.html") {
    return new Response(renderPage(req), {
      headers: { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" },
    });
  }
  if (rest === "/realtime-js.js") {
    if (bundle === null) {
      return new Response("realtime-js.js was not built: run examples/functions/realtime-demo/build.sh, redeploy", {
        status: 503,
        headers: { "content-type": "text/plain; charset=utf-8" },
      });
    }
    return new Response(bundle, {
      headers: { "content-type": "text/javascript; charset=utf-8", "cache-control": "public, max-age=300" },
    });
  }
  return Response.json({ error: `no such page: ${rest}` }, { status: 404 });
});
