"""Progress events on the wire: the names the library emits are the names its readers know.

The client (client/fitprobe_client/phases.py) ships without torch and without this package, so it keeps
its own words per phase; this holds those names to the library's `Phase`, and the JSON a stored event
becomes to what it was with plain strings.
"""

from __future__ import annotations

import json
import typing

from fitprobe.probe import events
from fitprobe.probe.events import EventType, Phase
from fitprobe_client.phases import BATCH_SEARCH_WORDS, PHASE_WORDS, batch_trial_words, phase_words


def test_every_phase_the_client_words_is_one_the_library_emits():
    assert set(PHASE_WORDS) <= {phase.value for phase in Phase}


def test_a_phase_event_is_the_same_json_and_words_as_with_plain_strings():
    event = events.progress(Phase.SIZING_THE_STEP, 2, 6, "LoRA (--lora)")
    assert json.dumps(event) == ('{"type": "phase", "phase": "sizing_the_step", "done": 2, "total": 6, '
                                 '"option": "LoRA (--lora)"}')
    assert phase_words(json.loads(json.dumps(event))) == phase_words(event) == \
        "sizing the step 2/6: LoRA (--lora)"
    assert f"{Phase.PROBING}" == str(Phase.PROBING) == "probing" and Phase.PROBING == "probing"


def test_a_trial_event_carries_the_trials_fields_after_its_type():
    event = events.trial({"micro_batch": 4, "fits": True})
    assert json.dumps(event) == '{"type": "trial", "micro_batch": 4, "fits": true}'
    assert event["type"] == EventType.TRIAL == "trial"


def test_an_event_holds_plain_strings_so_any_serializer_writes_the_names_value():
    for event in (events.phase(Phase.PLACED, device="cpu"), events.progress(Phase.BUILDING_CUT, 1, 2, "2 of 8 layers"),
                  events.trial_started(1), events.verify_step(1, 3), events.whatif_cell(1, 2, "LoRA", seq_len=64)):
        assert all(type(value) is not EventType and type(value) is not Phase for value in event.values()), event


def test_an_evaluation_or_generation_trial_reads_as_its_search_and_size_on_the_command_line():
    fits = json.loads(json.dumps(events.batch_trial("generation", 8, True, 3 << 30, None)))
    assert batch_trial_words(fits) == "generate batch 8: fits, peak 3.0GiB"
    refused = events.batch_trial("generation_length", 512, False, None, "the estimate stops at 4096 layer-tokens")
    assert batch_trial_words(refused) == ("generate batch 1, new tokens 512: does not fit (the estimate stops at "
                                          "4096 layer-tokens)")
    assert set(BATCH_SEARCH_WORDS) == set(typing.get_args(events.BatchSearch))
