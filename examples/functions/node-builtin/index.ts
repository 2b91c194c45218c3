// Node built-ins work without any download: node:crypto and node:buffer ship inside Deno.
// POST a body → its sha256 (hex) and base64.
import { createHash, randomUUID } from "node:crypto";
import { Buffer } from "node:buffer";

Deno.serve(async (req: Request) => {
  const data = Buffer.from(await req.arrayBuffer());
  return Response.json({
    sha256: createHash("sha256").update(data).digest("hex"),
    base64: data.toString("base64"),
    bytes: data.length,
    request_id: randomUUID(),
  });
});
