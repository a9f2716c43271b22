"""The embedded log compacts what is declared compacted (a table, not a history), as Kafka's cleaner
does: a topic of leases renewed every two seconds must not grow with the days."""

from __future__ import annotations

from pathlib import Path

from producers.embedded_log_file import LogFile


def test_a_compacted_topic_keeps_the_latest_record_per_key_and_its_offsets(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "log.db", default_partitions={"table": 3, "history": 3}, compacted=["table"])
    for round_ in range(50):
        log.append([("table", f"k{k}".encode(), f"{round_}".encode(), ()) for k in range(4)])
        log.append([("history", f"k{k}".encode(), f"{round_}".encode(), ()) for k in range(4)])
    table = [r for p in range(3) for r in log.read("table", p, 0, 1000)]
    assert sorted((r.key, r.value) for r in table) == [(f"k{k}".encode(), b"49") for k in range(4)]
    assert sum(log.end_offset("table", p) for p in range(3)) == 200, "offsets keep counting"
    history = [r for p in range(3) for r in log.read("history", p, 0, 1000)]
    assert len(history) == 200, "other topics keep every record"
    for partition in range(3):
        kept = [r.offset for r in log.read("table", partition, 0, 1000)]
        end = log.end_offset("table", partition)
        assert kept == list(range(end - len(kept), end)), "the newest records are the ones kept"
    log.close()


def test_the_same_key_in_one_batch_leaves_its_last_value(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "log.db", default_partitions={"table": 1}, compacted=["table"])
    log.append([("table", b"k", b"1", ()), ("table", b"k", b"2", ()), ("table", b"j", b"1", ())])
    assert [(r.key, r.value) for r in log.read("table", 0, 0, 10)] == [(b"k", b"2"), (b"j", b"1")]
    log.close()
