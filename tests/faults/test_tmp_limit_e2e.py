"""A function's temp dir: its own per process, limited in size, gone with the process, swept after a crash.

A real `mbworker serve` with real Deno: a function filling its TMPDIR past `tmp_mb` is killed with 546 and the
next request gets a fresh process and an empty dir; other functions keep serving; the dir goes when its process
exits, however it exits (a limit kill, a crash, a retire); a daemon killed outright leaves its dirs behind, and the
next start removes them.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from mbworker.runtimes.deno.tmpquota import MIN_ENTRY, usage
from tests.conftest import require_binary
from tests.daemon.conftest import BUNDLED_DENO
from tests.daemon.fixtures import write_function
from tests.worker_process import RunningWorker, run_worker

FILLER = """
const tmp = Deno.env.get("TMPDIR");
Deno.serve(async (req) => {
  const what = new URL(req.url).searchParams.get("do");
  if (what === "fill") {  // 100 MiB in 256 KiB writes, about 50 MB/s: far past the limit
    const chunk = new Uint8Array(256 * 1024).fill(7);
    using f = await Deno.open(`${tmp}/big`, { write: true, create: true });
    for (let i = 0; i < 400; i++) { await f.write(chunk); await new Promise((r) => setTimeout(r, 5)); }
    return new Response("wrote 100 MiB");
  }
  if (what === "hidden") {  // written, deleted, still open: no walk of the dir sees it
    const f = await Deno.open(`${tmp}/ghost`, { write: true, create: true });
    await Deno.remove(`${tmp}/ghost`);
    const chunk = new Uint8Array(256 * 1024).fill(7);
    for (let i = 0; i < 400; i++) { await f.write(chunk); await new Promise((r) => setTimeout(r, 5)); }
    return new Response("wrote 100 MiB nobody sees");
  }
  if (what === "keep") await Deno.writeTextFile(`${tmp}/kept`, "x");
  if (what === "exit") Deno.exit(3);
  const files = [...Deno.readDirSync(tmp)].map((e) => e.name);
  return Response.json({ tmp, same: [Deno.env.get("TMP"), Deno.env.get("TEMP"), Deno.cwd()], files });
});
"""
CALM = 'Deno.serve(() => new Response("calm"));\n'


async def _info(http: httpx.AsyncClient, w: RunningWorker, query: str = "") -> dict[str, object]:
    r = await http.get(f"{w.public_url}/functions/v1/filler{query}", headers=w.auth())
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


async def _gone(path: Path) -> None:
    """The dir is removed right after its process is reaped; nothing reports that moment, so look for it."""
    with trio.fail_after(20):
        while await trio.Path(path).exists():  # noqa: ASYNC110 - polling the filesystem: no event to wait for
            await trio.sleep(0.05)


async def test_temp_dir_limit_and_lifetime(tmp_path: Path) -> None:
    require_binary("deno", BUNDLED_DENO)
    data = (tmp_path / "data").resolve()
    filler = write_function(tmp_path / "src", "filler", FILLER, toml="[limits]\ntmp_mb = 4\nmax_processes = 1\n")
    calm = write_function(tmp_path / "src", "calm", CALM)
    async with run_worker(data) as w, httpx.AsyncClient(timeout=60, trust_env=False) as http:
        await w.deploy(filler)
        await w.deploy(calm)
        first = await _info(http, w)
        tmp = Path(str(first["tmp"]))
        assert await trio.Path(tmp).is_dir()
        assert tmp.is_relative_to(data / "scratch" / "deno")
        assert first["same"] == [str(tmp)] * 3  # TMP, TEMP and the cwd are the same dir
        assert first["files"] == []

        calm_answers: list[int] = []

        async def fill(query: str) -> httpx.Response:
            async with trio.open_nursery() as n:

                async def calm_meanwhile() -> None:
                    r = await http.get(f"{w.public_url}/functions/v1/calm", headers=w.auth())
                    calm_answers.append(r.status_code)

                n.start_soon(calm_meanwhile)
                return await http.get(f"{w.public_url}/functions/v1/filler{query}", headers=w.auth())

        started = trio.current_time()
        r = await fill("?do=fill")
        took = trio.current_time() - started
        assert r.status_code == 546, r.text
        assert r.json()["code"] == "WORKER_LIMIT"
        assert "[disk]" in r.json()["message"]
        assert took < 30, took  # generous: the limit is crossed after ~0.1 s; measured at ~0.15 s
        line = await w.wait_for_output("over the 4 MiB limit")
        assert "temp dir uses" in line
        await _gone(tmp)

        again = await _info(http, w)  # a fresh process, a fresh empty dir
        assert again["files"] == []
        assert again["tmp"] != str(tmp)

        # A deleted file still held open uses the disk until closed: counted too.
        hidden_tmp = Path(str(again["tmp"]))
        r = await fill("?do=hidden")
        assert r.status_code == 546, r.text
        await _gone(hidden_tmp)
        assert calm_answers == [200, 200]  # the other function served while these were filling their dirs

        crashing = Path(str((await _info(http, w, "?do=keep"))["tmp"]))
        r = await http.get(f"{w.public_url}/functions/v1/filler?do=exit", headers=w.auth())
        assert r.status_code == 500
        await _gone(crashing)

        retired = Path(str((await _info(http, w, "?do=keep"))["tmp"]))
        await w.deploy(filler)  # v2 goes live, v1 is retired
        await _gone(retired)
        assert (await http.get(f"{w.public_url}/functions/v1/calm", headers=w.auth())).text == "calm"


async def test_a_restart_sweeps_what_a_killed_daemon_left(tmp_path: Path) -> None:
    require_binary("deno", BUNDLED_DENO)
    data = (tmp_path / "data").resolve()
    filler = write_function(tmp_path / "src", "filler", FILLER)
    legacy = data / "scratch" / "functions" / "filler"  # where earlier releases kept a function's temp files
    async with run_worker(data) as w, httpx.AsyncClient(timeout=60, trust_env=False) as http:
        await w.deploy(filler)
        left = Path(str((await _info(http, w, "?do=keep"))["tmp"]))
        w.process.kill()  # no cleanup of any kind: the Deno child dies with it (parent-death signal)
        await w.process.wait()
    assert (left / "kept").exists()
    legacy.mkdir(parents=True)
    (legacy / "old").write_text("x")

    async with run_worker(data) as w, httpx.AsyncClient(timeout=60, trust_env=False) as http:
        assert not left.parents[2].exists()  # the killed daemon's whole run dir
        runs = [p.name for p in (data / "scratch" / "deno").iterdir()]
        assert len(runs) == 2  # the live run dir and its lock
        assert {n.endswith(".lock") for n in runs} == {True, False}
        assert not legacy.parent.exists()
        assert (await _info(http, w))["files"] == []


def test_what_a_temp_dir_is_charged(tmp_path: Path) -> None:
    d = tmp_path / "tmp"
    (d / "sub").mkdir(parents=True)
    assert usage(str(d)) == MIN_ENTRY  # the subdir itself
    with (d / "sparse").open("wb") as f:
        f.truncate(1 << 30)  # 1 GiB long, nothing written: it holds no disk
    (d / "sub" / "data").write_bytes(b"x" * (1 << 20))
    for i in range(100):  # empty files still take inodes
        (d / f"empty-{i}").touch()
    (d / "link").symlink_to("/usr")  # not followed
    used = usage(str(d))
    assert 102 * MIN_ENTRY + (1 << 20) <= used < 104 * MIN_ENTRY + (1 << 20) + 65536
    assert usage(str(tmp_path / "gone")) == 0
