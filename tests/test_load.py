"""A short run of the load-with-faults driver (benchmarks/load.py runs 32 devices for
60 s): devices asking all through a server SIGKILLed and restarted and a broker restart,
against two server agent processes on one shared subscription."""
from __future__ import annotations

from edgeqtl.loadtest import Fault, LoadTest, server_process_starter, tiny_setup


def test_every_request_is_answered_once_and_right_through_a_server_kill_and_a_broker_restart(mosquitto, tmp_path):
    server_half, frames, expected = tiny_setup(tmp_path)
    test = LoadTest(mosquitto, server_process_starter(server_half, mosquitto.port, tmp_path), frames,
                    lambda k, reply: reply.json().get("text") == expected[k], timeout=2.0, give_up_s=30.0)
    report = test.run(devices=6, seconds=10, faults=[Fault(2.0, "kill_server", 0, restart_after_s=1.0),
                                                      Fault(6.0, "restart_broker")])
    s = report.summary()
    assert len(s["faults"]) == 3, s
    assert s["lost"] == 0 and s["wrong"] == 0, s
    assert s["answered"] == s["sent"] and s["answered"] > 50, s
