// A JSON greeting. GET /hello?name=Ada or POST /hello {"name": "Ada"}.
import "jsr:@supabase/functions-js/edge-runtime.d.ts";

Deno.serve(async (req: Request) => {
  const url = new URL(req.url);
  let name = url.searchParams.get("name");
  if (!name && req.method === "POST") {
    try {
      const body = await req.json();
      if (typeof body?.name === "string") name = body.name;
    } catch {
      return Response.json({ error: "body must be JSON" }, { status: 400 });
    }
  }
  return Response.json({ message: `Hello ${name ?? "world"}!` });
});
