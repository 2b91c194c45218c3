// Server-Sent Events: GET /sse?count=5&interval_ms=200 streams `count` events, one every `interval_ms`.
// Each event is flushed as it is produced (the worker streams response chunks; nothing is buffered).
import "jsr:@supabase/functions-js/edge-runtime.d.ts";

Deno.serve((req: Request) => {
  const url = new URL(req.url);
  const count = Math.min(Number(url.searchParams.get("count") ?? 5), 100);
  const interval = Math.min(Number(url.searchParams.get("interval_ms") ?? 200), 10_000);
  const encoder = new TextEncoder();
  let timer: number | undefined;
  const body = new ReadableStream<Uint8Array>({
    start(controller) {
      let n = 0;
      const tick = () => {
        n++;
        controller.enqueue(encoder.encode(`id: ${n}\nevent: tick\ndata: ${JSON.stringify({ n, at: Date.now() })}\n\n`));
        if (n >= count) controller.close();
        else timer = setTimeout(tick, interval);
      };
      tick();
    },
    cancel() {
      clearTimeout(timer); // the client went away
    },
  });
  return new Response(body, {
    headers: { "content-type": "text/event-stream", "cache-control": "no-cache" },
  });
});
