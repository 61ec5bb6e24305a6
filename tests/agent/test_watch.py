"""The agent's watch decisions (kubetune_agent.watch, pure): what a LIST, each event and the end of a
stream mean, as client-go's reflector decides them."""

from __future__ import annotations

from kubetune.api import serving
from kubetune_agent import watch

NAME = "intents-desired"


def config_map(rv: str, text: str | None = "{}", name: str = NAME) -> dict:
    data = {} if text is None else {serving.DESIRED_KEY: text}
    return {"metadata": {"name": name, "resourceVersion": rv}, "data": data}


def test_a_list_delivers_the_config_map_and_watches_from_the_lists_resource_version():
    step = watch.after_list({"metadata": {"resourceVersion": "1200"}, "items": [config_map("1100", "A")]}, NAME)
    assert step == watch.Step(watch.Cursor("1200"), deliver=True, text="A")
    empty = watch.after_list({"metadata": {"resourceVersion": "1300"}, "items": []}, NAME)
    assert empty == watch.Step(watch.Cursor("1300"))  # no ConfigMap: nothing delivered, the last one stays


def test_added_and_modified_deliver_at_once_and_move_the_cursor():
    cursor = watch.Cursor("1200")
    for kind in ("ADDED", "MODIFIED"):
        step = watch.on_event(cursor, {"type": kind, "object": config_map("1201", "B")}, NAME)
        assert step == watch.Step(watch.Cursor("1201"), deliver=True, text="B")
    without_key = watch.on_event(cursor, {"type": "MODIFIED", "object": config_map("1202", None)}, NAME)
    assert without_key == watch.Step(watch.Cursor("1202"))


def test_deleted_bookmarks_and_other_objects_only_move_the_cursor():
    cursor = watch.Cursor("1200", failures=2)
    assert watch.on_event(cursor, {"type": "DELETED", "object": config_map("1203")}, NAME) == \
        watch.Step(watch.Cursor("1203"))  # a deleted ConfigMap never unloads everything
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "1500"}}}
    assert watch.on_event(cursor, bookmark, NAME) == watch.Step(watch.Cursor("1500"))
    other = watch.on_event(cursor, {"type": "MODIFIED", "object": config_map("1501", "X", "other")}, NAME)
    assert other == watch.Step(watch.Cursor("1501"))


def test_gone_relists_at_once_then_with_backoff():
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
    first = watch.on_event(watch.Cursor("1200"), gone, NAME)
    assert first == watch.Step(watch.Cursor(None, 1), restart=True, delay=0.0)
    second = watch.on_event(first.cursor, gone, NAME)
    assert second.cursor == watch.Cursor(None, 2) and second.restart and second.delay == 1.6
    refused = watch.on_stream_end(watch.Cursor("1200"), status=410)
    assert refused == watch.Step(watch.Cursor(None, 1), restart=True, delay=0.0)


def test_other_errors_relist_after_backoff():
    error = {"type": "ERROR", "object": {"kind": "Status", "code": 500}}
    step = watch.on_event(watch.Cursor("1200"), error, NAME)
    assert step == watch.Step(watch.Cursor(None, 1), restart=True, delay=0.8)
    assert watch.on_list_failed(step.cursor) == watch.Step(watch.Cursor(None, 2), restart=True, delay=1.6)


def test_a_server_timeout_rewatches_at_once_and_a_drop_after_backoff_from_the_same_cursor():
    assert watch.on_stream_end(watch.Cursor("1200", 3)) == watch.Step(watch.Cursor("1200", 0), restart=True)
    dropped = watch.on_stream_end(watch.Cursor("1200"), dropped=True)
    assert dropped == watch.Step(watch.Cursor("1200", 1), restart=True, delay=0.8)
    forbidden = watch.on_stream_end(dropped.cursor, status=403)  # a Role without watch: keep trying, slowly
    assert forbidden == watch.Step(watch.Cursor("1200", 2), restart=True, delay=1.6)


def test_backoff_doubles_to_the_cap_with_jitter_on_top():
    assert [watch.backoff(n) for n in range(8)] == [0.0, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0]
    assert watch.backoff(100, jitter=0.5) == 45.0


def test_the_watch_asks_for_one_object_from_the_cursor_with_bookmarks_and_a_spread_timeout():
    params = watch.watch_params(watch.Cursor("1200"), NAME, 0.5)
    assert params == {"watch": "true", "fieldSelector": f"metadata.name={NAME}", "allowWatchBookmarks": "true",
                      "resourceVersion": "1200", "timeoutSeconds": "450"}
    assert watch.list_params(NAME) == {"fieldSelector": f"metadata.name={NAME}"}
