// A hostile function: tries what a user function must not be able to do and reports each outcome as JSON.
// "denied" = Deno refused (NotCapable); "allowed" = it worked; anything else = failed for another reason.
import net from "node:net";

const outcomes: Record<string, string> = {};

function classify(e: unknown): string {
  const err = e as Error & { cause?: Error };
  const text = `${err?.name}: ${err?.message} ${err?.cause?.message ?? ""}`;
  return /NotCapable|Requires [a-z]+ access|getaddrinfo EPERM/.test(text) ? "denied" : "failed: " + text.slice(0, 200);
}

async function attempt(name: string, f: () => unknown): Promise<void> {
  try {
    await f();
    outcomes[name] = "allowed";
  } catch (e) {
    outcomes[name] = classify(e);
  }
}

async function get(url: string): Promise<void> {
  const r = await fetch(url);
  await r.body?.cancel();
}

function tcp(host: string, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, host, () => {
      s.destroy();
      resolve();
    });
    s.on("error", reject);
  });
}

Deno.serve(async (req) => {
  const q = new URL(req.url).searchParams;
  const admin = Number(q.get("admin"));
  const svc = Number(q.get("svc"));
  const otherBundle = q.get("other_bundle") ?? "";
  const otherTmp = q.get("other_tmp") ?? "";
  const dataDir = q.get("data") ?? "";
  for (const [name, host] of [
    ["ipv4", "127.0.0.1"], ["localhost", "localhost"], ["ipv6", "[::1]"], ["short", "127.1"],
    ["hex", "0x7f000001"], ["mapped", "[::ffff:127.0.0.1]"], ["any", "0.0.0.0"],
  ]) {
    await attempt(`fetch admin ${name}`, () => get(`http://${host}:${admin}/admin/v1/health`));
  }
  await attempt("fetch service", () => get(`http://127.0.0.1:${svc}/`));
  await attempt("connect service", async () => (await Deno.connect({ hostname: "127.0.0.1", port: svc })).close());
  await attempt("node:net service", () => tcp("localhost", svc));
  await attempt("websocket service", () => new Promise((resolve, reject) => {
    try {
      const ws = new WebSocket(`ws://127.0.0.1:${svc}/`);
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error("websocket error"));
    } catch (e) {
      reject(e);
    }
  }));
  await attempt("listen", () => Deno.listen({ port: 0 }).close());
  const states: Record<string, string> = {};
  for (const host of [
    "10.0.0.5:5432", "172.16.0.1:443", "192.168.1.1:80", "100.64.0.1:80", "169.254.169.254:80",
    "metadata.google.internal:80", `[::1]:${admin}`, "example.com:443", "8.8.8.8:53", "api.example.com:443",
  ]) {
    states[host] = (await Deno.permissions.query({ name: "net", host })).state;
  }
  const own = new URL(import.meta.url).pathname;
  const tmp = Deno.env.get("TMPDIR") ?? "";
  await attempt("read own bundle", () => Deno.readTextFile(own));
  await attempt("write own tmp", async () => {
    await Deno.writeTextFile(`${tmp}/mine.txt`, "ok");
    if ((await Deno.readTextFile(`${tmp}/mine.txt`)) !== "ok") throw new Error("read back differs");
  });
  await attempt("read other bundle", () => Deno.readTextFile(`${otherBundle}/index.ts`));
  await attempt("list other bundle", () => Array.fromAsync(Deno.readDir(otherBundle)));
  await attempt("read other tmp", () => Deno.readTextFile(`${otherTmp}/planted.txt`));
  await attempt("write other tmp", () => Deno.writeTextFile(`${otherTmp}/evil.txt`, "x"));
  await attempt("read admin token", () => Deno.readTextFile(`${dataDir}/secrets/admin_token`));
  await attempt("list data dir", () => Array.fromAsync(Deno.readDir(dataDir)));
  await attempt("write data dir", () => Deno.writeTextFile(`${dataDir}/evil.txt`, "x"));
  await attempt("read environ", () => Deno.readTextFile("/proc/self/environ"));
  await attempt("read parent environ", () => Deno.readTextFile(`/proc/${Deno.ppid}/environ`));
  await attempt("read etc", () => Deno.readTextFile("/etc/passwd"));
  await attempt("write etc", () => Deno.writeTextFile("/etc/evil", "x"));
  await attempt("subprocess", () => new Deno.Command("/bin/sh", { args: ["-c", "true"] }).output());
  await attempt("ffi", () => Deno.dlopen("libc.so.6", { getpid: { parameters: [], result: "i32" } }));
  await attempt("signal parent", () => Deno.kill(Deno.ppid, "SIGCONT"));
  await attempt("sys info", () => Deno.hostname());
  return Response.json({ outcomes, states, env: Object.keys(Deno.env.toObject()) });
});
