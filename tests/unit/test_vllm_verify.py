"""Unit tests for plugins/modules/vllm_verify.py.

The pure checks are tested directly. The module as a whole (argument spec,
urllib, exit/fail) runs in-process against a local HTTP server on 127.0.0.1 that
replays answers recorded from a real vLLM 0.11.0 (tests/unit/data/vllm_0.11.0,
see its README): the messages below are what an operator would see.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from ansible.module_utils.testing import patch_module_args
from tests.unit.local_http import LocalServer, Request, refused_url
from tests.unit.loader import load

DATA = Path(__file__).resolve().parent / "data" / "vllm_0.11.0"
API_KEY = "test-key"  # the key the recordings were made with


vv = load("plugins/modules/vllm_verify.py")


def recording(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def text_of(name: str) -> str:
    return recording(name)["body"]["choices"][0]["message"]["content"]


BASE_TEXT = text_of("chat_base")
ALPHA_TEXT = text_of("chat_alpha")


def params(**overrides: Any) -> dict:
    """Module parameters with the argument spec's defaults."""
    values = {k: v.get("default") for k, v in vv.ARGUMENT_SPEC.items()}
    values.update(url="http://127.0.0.1:1", base_model="tiny",
                  adapters=["alpha", "beta"])
    values.update(overrides)
    return values


# --- the recordings themselves --------------------------------------------


def test_recordings_show_what_the_module_relies_on() -> None:
    """If a re-recording changes these facts, the module's premises changed."""
    assert BASE_TEXT != ALPHA_TEXT != text_of("chat_beta")
    assert text_of("chat_lora_name_alpha") == ALPHA_TEXT          # with middleware
    assert text_of("no_middleware_chat_lora_name_alpha") == BASE_TEXT  # without
    assert recording("no_middleware_chat_lora_name_alpha")["body"]["model"] == "tiny"
    assert recording("no_middleware_chat_lora_name_unknown")["status"] == 200
    assert recording("chat_lora_name_unknown")["body"] == {"error": {
        "message": "The model `vllm-verify-no-such-adapter` does not exist.",
        "type": "NotFoundError", "param": None, "code": 404}}


def test_recorded_requests_are_what_the_module_sends() -> None:
    sent = vv.chat_payload("tiny", params()["prompt"], 16, 0, "alpha")
    assert recording("chat_lora_name_alpha")["request"]["body"] == sent


# --- pure logic --------------------------------------------------------------


def cards() -> list[dict]:
    return copy.deepcopy(recording("models")["body"]["data"])


def test_recorded_cards_match_the_declaration() -> None:
    assert vv.card_problems(cards(), "tiny", ["alpha", "beta"], False) == []


def test_missing_base_model_is_named_with_what_is_served() -> None:
    assert vv.card_problems(cards(), "big", [], True) == [
        "base model 'big' is not served (served: ['alpha', 'beta', 'tiny'])"]


def test_base_model_that_is_an_adapter_is_refused() -> None:
    problems = vv.card_problems(cards(), "alpha", ["beta"], False)
    assert problems[0] == "'alpha' is an adapter of 'tiny', not a base model"
    assert "adapter 'beta': its parent is 'tiny', expected 'alpha'" in problems
    assert not any("'alpha': served but not declared" in p for p in problems)


def test_declared_adapter_without_card_is_named() -> None:
    assert vv.card_problems(cards(), "tiny", ["alpha", "beta", "delta"], False) == [
        "adapter 'delta': not served (no card in /v1/models)"]


def test_adapter_hanging_off_another_base_is_named() -> None:
    data = cards()
    data[1]["parent"] = "other"
    assert vv.card_problems(data, "tiny", ["alpha", "beta"], False) == [
        "adapter 'alpha': its parent is 'other', expected 'tiny'"]


def test_undeclared_adapter_is_drift_unless_allowed() -> None:
    assert vv.card_problems(cards(), "tiny", ["alpha"], False) == [
        "adapter 'beta': served but not declared (drift; remove it or declare it)"]
    assert vv.card_problems(cards(), "tiny", ["alpha"], True) == []


def test_chat_payload_is_greedy_and_seeded() -> None:
    payload = vv.chat_payload("alpha", "hi", 8, 3)
    assert payload == {"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 8, "temperature": 0, "seed": 3}
    assert vv.chat_payload("tiny", "hi", 8, 3, "alpha")["lora_name"] == "alpha"


def test_answer_text_and_error_message_read_vllm_shapes() -> None:
    assert vv.answer_text(recording("chat_alpha")["body"]) == ALPHA_TEXT
    assert vv.answer_text(recording("chat_lora_name_unknown")["body"]) is None
    assert vv.answer_text({"choices": [{"message": {"content": None}}]}) == ""
    assert vv.error_message(recording("chat_lora_name_unknown")["body"]) == \
        "The model `vllm-verify-no-such-adapter` does not exist."
    assert vv.error_message(recording("models_unauthorized")["body"]) == "Unauthorized"
    assert vv.error_message("<html>bad gateway</html>") == "'<html>bad gateway</html>'"


def test_quote_is_one_short_line() -> None:
    assert vv.quote("a\nb") == "'a\\nb'"
    assert vv.quote("x" * 200) == "'" + "x" * 80 + "...'"
    assert vv.quote(None) == "no text"


def _result(**overrides: Any) -> Any:
    values = dict(adapter="alpha", status=200, model="alpha", text=ALPHA_TEXT,
                  differs_from_base=True)
    values.update(overrides)
    return vv.AdapterResult(**values)


def test_adapter_answer_different_from_base_passes() -> None:
    assert vv.adapter_problems(_result(), BASE_TEXT) == []


def test_adapter_answer_identical_to_base_fails_with_the_text() -> None:
    result = _result(text=BASE_TEXT, differs_from_base=False)
    assert vv.adapter_problems(result, BASE_TEXT) == [
        f"adapter 'alpha': answer identical to the base model's ('{BASE_TEXT}'): "
        "the adapter is not applied"]


def test_adapter_error_and_wrong_model_are_named() -> None:
    assert vv.adapter_problems(_result(status=404, text="The model `alpha` does "
                                       "not exist.", differs_from_base=False),
                               BASE_TEXT) == [
        "adapter 'alpha': HTTP 404 (The model `alpha` does not exist.)"]
    assert vv.adapter_problems(_result(model="tiny"), BASE_TEXT) == [
        "adapter 'alpha': the response names model 'tiny', not the adapter"]


def test_lora_name_answer_checks() -> None:
    ok = vv.lora_name_problems("alpha", 200, "alpha", ALPHA_TEXT, ALPHA_TEXT, BASE_TEXT)
    assert ok == []
    ignored = vv.lora_name_problems("alpha", 200, "tiny", BASE_TEXT, ALPHA_TEXT, BASE_TEXT)
    assert ignored == [f"adapter 'alpha' via lora_name: answered by 'tiny' with the "
                       f"base model's text ('{BASE_TEXT}'): lora_name is ignored"]
    other = vv.lora_name_problems("alpha", 200, "beta", "zzz", ALPHA_TEXT, BASE_TEXT)
    assert other == [
        f"adapter 'alpha' via lora_name: answer 'zzz' differs from the model='alpha' "
        f"answer '{ALPHA_TEXT}'",
        "adapter 'alpha' via lora_name: the response names model 'beta'"]
    assert vv.lora_name_problems("alpha", 400, None, "conflict", ALPHA_TEXT,
                                 BASE_TEXT) == ["adapter 'alpha' via lora_name: HTTP 400 (conflict)"]


def test_unknown_lora_name_must_be_404() -> None:
    name = "vllm-verify-no-such-adapter"
    assert vv.unknown_lora_name_problems(name, 404, {}) == []
    fallback = recording("no_middleware_chat_lora_name_unknown")
    assert vv.unknown_lora_name_problems(name, 200, fallback["body"]) == [
        f"lora_name '{name}' (no such adapter) was answered with HTTP 200 "
        f"('{BASE_TEXT}'): unknown adapters fall back to the base model"]
    assert vv.unknown_lora_name_problems(name, 500, {"error": {"message": "boom"}}) == [
        f"lora_name '{name}' (no such adapter): HTTP 500 (boom), expected 404"]


def test_unused_name_avoids_served_ids() -> None:
    assert vv.unused_name(["tiny"]) == vv.UNKNOWN_ADAPTER
    assert vv.unused_name([vv.UNKNOWN_ADAPTER]) == vv.UNKNOWN_ADAPTER + "-x"


def test_run_with_fake_http_stops_when_base_fails() -> None:
    def http(method: str, path: str, payload: Optional[dict]) -> tuple[int, Any]:
        if path == "/v1/models":
            return 200, recording("models")["body"]
        return 500, {"error": {"message": "engine dead"}}

    with pytest.raises(vv.VerifyError, match=r"base model 'tiny': HTTP 500 \(engine dead\)"):
        vv.run(params(), http)


def test_run_keeps_what_it_learnt_when_an_adapter_request_cannot_be_made() -> None:
    def http(method: str, path: str, payload: Optional[dict]) -> tuple[int, Any]:
        if path == "/v1/models":
            return 200, recording("models")["body"]
        if payload and payload["model"] == "beta":
            raise vv.VerifyError("POST http://h/v1/chat/completions: timed out")
        return 200, recording(f"chat_{'base' if payload['model'] == 'tiny' else 'alpha'}")["body"]

    with pytest.raises(vv.VerifyError) as info:
        vv.run(params(), http)
    assert str(info.value) == ("chat request for model 'beta': "
                               "POST http://h/v1/chat/completions: timed out")
    assert info.value.facts["base_text"] == BASE_TEXT
    assert [r["adapter"] for r in info.value.facts["results"]] == ["alpha"]


# --- the whole module against a replay of the real server ----------------


class Replay(LocalServer):
    """Answers each request with the recording whose request it equals."""

    def __init__(self, recordings: list[dict]) -> None:
        super().__init__()
        self.recordings = recordings

    def answer(self, request: Request) -> tuple[int, Any]:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":  # as vLLM's --api-key does for /v1
            return 401, recording("models_unauthorized")["body"]
        for rec in self.recordings:
            req = rec["request"]
            if (req["method"], req["path"], req.get("body")) == (request.method, request.path, request.body):
                return rec["status"], rec["body"]
        return 500, {"error": {"message": f"no recording for {request.body}"}}


@pytest.fixture
def replay(request: pytest.FixtureRequest) -> Iterator[Replay]:
    names: list[str] = request.param
    with Replay([recording(n) for n in names]) as server:
        yield server


WITH_MIDDLEWARE = ["models", "chat_base", "chat_alpha", "chat_beta",
                   "chat_lora_name_alpha", "chat_lora_name_beta", "chat_lora_name_unknown"]
WITHOUT_MIDDLEWARE = ["models", "no_middleware_chat_base", "no_middleware_chat_alpha",
                      "no_middleware_chat_lora_name_alpha",
                      "no_middleware_chat_lora_name_unknown"]


def run_module(args: dict, capsys: pytest.CaptureFixture) -> tuple[int, dict]:
    """Run main() as Ansible would; returns (exit code, result JSON)."""
    with patch_module_args(args), pytest.raises(SystemExit) as exit_info:
        vv.main()
    return exit_info.value.code, json.loads(capsys.readouterr().out)


def module_args(server: Replay, **overrides: Any) -> dict:
    args = {"url": server.url + "/", "api_key": API_KEY, "base_model": "tiny",
            "adapters": ["alpha", "beta"]}
    args.update(overrides)
    return args


@pytest.mark.parametrize("replay", [WITH_MIDDLEWARE], indirect=True)
def test_real_answers_with_middleware_pass(replay: Replay, capsys) -> None:
    rc, result = run_module(module_args(replay, lora_name_compat=True), capsys)
    assert rc == 0, result.get("msg")
    assert result["changed"] is False
    assert result["models"] == ["tiny", "alpha", "beta"]
    assert result["base_text"] == BASE_TEXT
    assert result["lora_name_unknown_status"] == 404
    assert result["results"][0] == {"adapter": "alpha", "status": 200, "model": "alpha",
                                    "text": ALPHA_TEXT, "differs_from_base": True,
                                    "lora_name_ok": True}
    assert [r["lora_name_ok"] for r in result["results"]] == [True, True]
    assert {s.headers.get("Authorization") for s in replay.seen} == {f"Bearer {API_KEY}"}
    assert API_KEY not in json.dumps(result)


@pytest.mark.parametrize("replay", [WITH_MIDDLEWARE], indirect=True)
def test_check_mode_runs_the_same_read_only_checks(replay: Replay, capsys) -> None:
    rc, result = run_module(module_args(replay, _ansible_check_mode=True), capsys)
    assert rc == 0 and result["changed"] is False
    assert result["results"][1]["lora_name_ok"] is None  # not asked for
    assert len(replay.seen) == 4  # models, base, alpha, beta


@pytest.mark.parametrize("replay", [WITHOUT_MIDDLEWARE], indirect=True)
def test_real_answers_without_middleware_fail_the_lora_name_proof(
        replay: Replay, capsys) -> None:
    rc, result = run_module(module_args(replay, adapters=["alpha"], lora_name_compat=True,
                                        allow_undeclared_adapters=True), capsys)
    assert rc == 1
    assert result["msg"] == (
        "vLLM verification failed: adapter 'alpha' via lora_name: answered by 'tiny' "
        f"with the base model's text ('{BASE_TEXT}'): lora_name is ignored; "
        "lora_name 'vllm-verify-no-such-adapter' (no such adapter) was answered with "
        f"HTTP 200 ('{BASE_TEXT}'): unknown adapters fall back to the base model")
    assert result["results"][0]["lora_name_ok"] is False
    assert result["results"][0]["differs_from_base"] is True
    assert result["lora_name_unknown_status"] == 200


@pytest.mark.parametrize("replay", [WITHOUT_MIDDLEWARE], indirect=True)
def test_selecting_by_model_needs_no_middleware(replay: Replay, capsys) -> None:
    rc, result = run_module(module_args(replay, adapters=["alpha"],
                                        allow_undeclared_adapters=True), capsys)
    assert rc == 0, result.get("msg")


@pytest.mark.parametrize("replay", [WITH_MIDDLEWARE], indirect=True)
def test_adapter_answering_like_the_base_fails(replay: Replay, capsys) -> None:
    """Synthetic: the recorded alpha answer with the base text, as an unapplied adapter gives."""
    for rec in replay.recordings:
        if rec["request"].get("body", {}).get("model") == "alpha":
            rec["body"]["choices"][0]["message"]["content"] = BASE_TEXT
    rc, result = run_module(module_args(replay), capsys)
    assert rc == 1
    assert result["msg"] == (
        "vLLM verification failed: adapter 'alpha': answer identical to the base "
        f"model's ('{BASE_TEXT}'): the adapter is not applied")
    assert [r["differs_from_base"] for r in result["results"]] == [False, True]


@pytest.mark.parametrize("replay", [WITH_MIDDLEWARE], indirect=True)
def test_undeclared_adapter_fails_as_drift(replay: Replay, capsys) -> None:
    rc, result = run_module(module_args(replay, adapters=["alpha"]), capsys)
    assert rc == 1
    assert result["msg"] == ("vLLM verification failed: adapter 'beta': served but "
                             "not declared (drift; remove it or declare it)")
    assert result["problems"] == [result["msg"].split(": ", 1)[1]]


@pytest.mark.parametrize("replay", [WITH_MIDDLEWARE], indirect=True)
def test_wrong_api_key_fails_on_the_first_request(replay: Replay, capsys) -> None:
    rc, result = run_module(module_args(replay, api_key="wrong"), capsys)
    assert rc == 1
    assert result["msg"] == "vLLM verification failed: GET /v1/models: HTTP 401 (Unauthorized)"
    assert "wrong" not in json.dumps(result)


def test_unreachable_server_fails_with_the_reason(capsys) -> None:
    url = refused_url()
    rc, result = run_module({"url": url, "base_model": "tiny", "timeout": 5}, capsys)
    assert rc == 1
    assert result["msg"].startswith(f"vLLM verification failed: GET {url}/v1/models: ")
    assert "refused" in result["msg"]
