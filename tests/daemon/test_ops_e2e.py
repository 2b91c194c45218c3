"""Operations through the real daemon: metrics under traffic, the logs API, SIGHUP reload, drain under load."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.fixtures import write_function
from tests.processes import deno_processes
from tests.worker_process import RunningWorker, run_worker


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_metrics_follow_traffic(worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path) -> None:
    await worker.deploy(write_function(tmp_path, "counted", "Deno.serve(() => new Response('ok'))"))
    admin = {"authorization": f"Bearer {worker.admin_token}"}
    assert (await http.get(f"{worker.admin_url}/metrics")).status_code == 401
    before = (await http.get(f"{worker.admin_url}/metrics", headers=admin)).text
    for _ in range(3):
        assert (await http.get(f"{worker.public_url}/functions/v1/counted", headers=worker.auth())).status_code == 200
    assert (await http.get(f"{worker.public_url}/functions/v1/counted")).status_code == 401
    assert (await http.get(f"{worker.public_url}/functions/v1/nope", headers=worker.auth())).status_code == 404
    after = (await http.get(f"{worker.admin_url}/metrics", headers=admin)).text
    name = "mbworker_invocations_total"
    assert _sample(after, name, function="counted", status="200") - _sample(before, name, function="counted") == 3
    assert _sample(after, name, function="counted", status="401") == 1
    assert 'function="nope"' not in after  # unknown slugs never become label values
    assert _sample(after, "mbworker_function_active_version", function="counted") == 1
    assert _sample(after, "mbworker_runtime_processes", runtime="deno") >= 1


async def test_logs_api_and_cli(worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path) -> None:
    source = "Deno.serve((req) => { console.log('visit', new URL(req.url).search); return new Response('ok'); })"
    await worker.deploy(write_function(tmp_path, "loggy", source))
    await http.get(f"{worker.public_url}/functions/v1/loggy?n=42", headers=worker.auth())
    await worker.wait_for_output("visit ?n=42")
    result = await worker.cli("functions", "logs", "loggy", "--since", "10m", check=True)
    assert b"visit ?n=42" in result.stdout
    missing = await worker.cli("functions", "logs", "ghost")
    assert missing.returncode != 0


async def test_sighup_changes_a_limit_live(tmp_path: Path, http: httpx.AsyncClient) -> None:
    config = tmp_path / "worker.toml"
    config.write_text("[limits]\nmax_request_bytes = 1000000\n")
    async with run_worker(tmp_path / "data", args=("--config", str(config))) as worker:
        await worker.deploy(write_function(tmp_path, "sink", "Deno.serve(async (r) => new Response(await r.text()))"))
        url = f"{worker.public_url}/functions/v1/sink"
        assert (await http.post(url, content=b"x" * 5000, headers=worker.auth())).status_code == 200
        config.write_text("[limits]\nmax_request_bytes = 1000\n")
        worker.process.send_signal(signal.SIGHUP)
        await worker.wait_for_output("reloaded configuration")
        r = await http.post(url, content=b"x" * 5000, headers=worker.auth())
        assert r.status_code == 413
        assert r.json()["code"] == "PAYLOAD_TOO_LARGE"
        # A broken file is refused and the running config stays.
        config.write_text("[limits]\nmax_request_bytes = 'lots'\n")
        worker.process.send_signal(signal.SIGHUP)
        await worker.wait_for_output("reload refused")
        assert (await http.post(url, content=b"x" * 500, headers=worker.auth())).status_code == 200


async def test_drain_under_load_loses_no_accepted_request(tmp_path: Path, http: httpx.AsyncClient) -> None:
    source = """Deno.serve(async () => {
      console.log('busy request');
      await new Promise((r) => setTimeout(r, 800));
      return new Response('finished');
    });"""
    async with run_worker(tmp_path / "data") as worker:
        await worker.deploy(write_function(tmp_path, "steady", source))
        url = f"{worker.public_url}/functions/v1/steady"
        results: list[int] = []

        async def one() -> None:
            r = await http.get(url, headers=worker.auth())
            results.append(r.status_code)
            assert r.text == "finished"

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(one)
            await worker.wait_for_output("busy request", count=12)  # every request is inside the function
            admin = {"authorization": f"Bearer {worker.admin_token}"}
            r = await http.post(f"{worker.admin_url}/admin/v1/drain", headers=admin)
            assert (r.status_code, r.json()) == (202, {"draining": True, "drained": False})
        assert results == [200] * 12
        # As the provisioner does on scale-in: ask again until the node says its work is done; then it exits.
        answers = []
        for _ in range(100):  # a poller's questions, 0.2 s apart (the provisioner's protocol), at most ~20 s
            answers.append((await http.post(f"{worker.admin_url}/admin/v1/drain", headers=admin)).json())
            if answers[-1]["drained"]:
                break
            await trio.sleep(0.2)
        assert answers[-1] == {"draining": True, "drained": True}
        with trio.fail_after(40):
            assert await worker.process.wait() == 0
    assert not deno_processes(worker.data_dir)


async def test_an_upgrade_request_is_left_for_the_helper_and_drains_the_node(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """The admin app's upgrade route through the node: refused while no helper watches; with one, the request
    file is left (from a worker thread) and the drain it starts runs in trio until the process exits."""
    data = tmp_path / "data"
    async with run_worker(data) as worker:
        admin = {"authorization": f"Bearer {worker.admin_token}"}
        url = f"{worker.admin_url}/admin/v1/upgrade"
        refused = await http.post(url, headers=admin, json={"version": "9.9.9"})
        assert (refused.status_code, refused.json()["code"]) == (501, "NOT_IMPLEMENTED")
        (data / "upgrade").mkdir()  # what the helper makes when it watches this node
        r = await http.post(url, headers=admin, json={"version": "9.9.9"})
        assert (r.status_code, r.json()) == (202, {"version": "9.9.9", "draining": True})
        assert (data / "upgrade" / "request").read_text() == '{"version": "9.9.9"}'
        await worker.wait_for_output("draining: grace")
        with trio.fail_after(60):
            assert await worker.process.wait() == 0
