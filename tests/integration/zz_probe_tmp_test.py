from __future__ import annotations
import httpx
from tests.integration.test_console import *  # noqa
from tests.integration.test_console import web, viewer, operator, anonymous, seed, pushed, submit, csrf_of, TOKENS, RULE  # noqa


async def test_probe(stubs, viewer, anonymous, web) -> None:
    await seed(stubs)
    event, enf = await pushed(stubs)
    for path in ["/events?reemit_of=%C2%B2", "/enforcements?event=%C2%B2", "/live/enforcements?id=%C2%B2",
                 "/live/enforcements?event=%C2%B2", "/live/events?trigger_ref=" + "a"*300,
                 "/live/enforcements?rule_ref=" + "a"*300]:
        r = await viewer.get(path)
        print(path[:60], r.status_code, r.text[:200].replace("\n"," ") if r.status_code != 200 else "")
    for eid in ["99999999999999999999", "²", "0"]:
        r = await submit(viewer, f"/rules/{RULE}/test", {"csrf": csrf_of(TOKENS["viewer"]), "event_id": eid})
        print("test event_id", eid, r.status_code)
    r = await submit(viewer, f"/rules/{RULE}/test", {"csrf": csrf_of(TOKENS["viewer"]), "payload": '{"a": 1e400}'})
    print("1e400", r.status_code)
    r = await submit(viewer, f"/rules/{RULE}/test", {"csrf": csrf_of(TOKENS["viewer"]), "payload": '{"a": NaN}'})
    print("NaN", r.status_code)
