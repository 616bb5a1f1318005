"""QEMU's return path as fastmfd reads it (a ``send --qemu`` source): every
message is judged on its header, a PONG answers a PING sent, and nothing comes
after SHUT; and as fastmfd answers on it (a ``listen --qemu`` destination) when
its source is gone or reads nothing. The ends at real QEMUs are in
test_qemu_send and test_qemu_receive."""

from __future__ import annotations

import logging
import socket
import struct

import pytest

from fastmfd._engine.qemu_return_path import ReturnPathAnswers
from fastmfd.errors import MigrationError, ProtocolError
from fastmfd.protocol.qemu_encoding import encode_open_return_path
from fastmfd.protocol.qemu_return_path import (ReturnPathDecoder, encode_rp_pong,
                                               encode_rp_shut, encode_rp_switchover_ack,
                                               knows_switchover_ack)

SWITCHOVER_ACK = encode_rp_switchover_ack()


def decoded(data: bytes, step: int) -> ReturnPathDecoder:
    decoder = ReturnPathDecoder("main channel (return path)", [1])
    for at in range(0, len(data), step):
        decoder.feed(data[at:at + step])
    return decoder


@pytest.mark.parametrize("step", [1, 3, 5, 64])
def test_a_destination_s_answers_are_read_however_they_are_cut(step):
    decoder = decoded(encode_rp_pong(1) + SWITCHOVER_ACK + encode_rp_shut(failed=False), step)
    assert decoder.unanswered == [] and decoder.switchover_acked and decoder.shut == 0
    assert decoder.pending == b""


def test_a_failed_load_is_shut_1():
    assert decoded(encode_rp_shut(failed=True), 8).shut == 1


def test_a_shut_not_yet_whole_is_not_taken():
    decoder = decoded(encode_rp_shut(failed=False)[:7], 7)
    assert decoder.shut is None and len(decoder.pending) == 7


@pytest.mark.parametrize("data, match", [
    (struct.pack(">HH", 0, 0), "return path message 0 "),
    (struct.pack(">HHQI", 4, 12, 0, 4096), "message REQ_PAGES .*sends only PONG"),
    (struct.pack(">HH", 99, 0), "return path message 99 "),
    (struct.pack(">HHQ", 1, 8, 0), "SHUT with 8 bytes of data, expected 4"),
    (struct.pack(">HHI", 7, 4, 0), "SWITCHOVER_ACK with 4 bytes of data, expected 0"),
    (encode_rp_pong(2), "PONG 2 answers no PING sent"),
    (encode_rp_pong(1) * 2, "PONG 1 answers no PING sent"),
    (SWITCHOVER_ACK * 2, "a second SWITCHOVER_ACK"),
    (encode_rp_shut(failed=False) + encode_rp_pong(1), "a message after SHUT"),
], ids=["invalid", "postcopy", "unknown", "long-shut", "long-ack", "unasked-pong",
        "second-pong", "second-ack", "after-shut"])
def test_what_a_precopy_destination_never_says_is_refused_naming_it(data, match):
    with pytest.raises(ProtocolError, match=match) as caught:
        decoded(data, len(data))
    assert caught.value.where == "main channel (return path)"


def test_a_refused_header_is_refused_before_its_data_comes():
    """A length of 65535 is not waited for: the header alone is refused."""
    with pytest.raises(ProtocolError, match="with 65535 bytes"):
        decoded(struct.pack(">HH", 2, 65535), 4)


def test_the_source_opens_the_return_path_as_qemu_does():
    """COMMAND OPEN_RETURN_PATH (no data), then COMMAND PING 1 (QEMU's
    migration_thread sends the same)."""
    assert encode_open_return_path(1) == bytes.fromhex("08" "0001" "0000"
                                                       "08" "0002" "0004" "00000001")


@pytest.mark.parametrize("machine, knows", [
    ("pc-i440fx-10.0", True), ("pc-q35-8.1", True), ("virt-9.2", True),
    ("s390-ccw-virtio-10.0", True), ("pc-i440fx-8.0", False), ("pc-i440fx-7.2", False),
    ("pc-q35-2.12", False), ("microvm", False), ("isapc", False), ("", False)])
def test_a_switchover_ack_goes_only_to_a_source_that_surely_knows_it(machine, knows):
    """A machine type >= 8.1 is made only by a QEMU >= 8.1, which knows SWITCHOVER_ACK;
    QEMU 7.2 fails its migration on it, and runs machine types up to 7.2, as later
    QEMUs do too: those, and types without a version, get none."""
    assert knows_switchover_ack(machine) is knows


# ------------------------------------------------ the destination's answers (listen --qemu)
def opened_answers(machine: str = "pc-i440fx-10.0"):
    """ReturnPathAnswers on one end of a socket pair, the source's end the other."""
    ours, source = socket.socketpair()
    answers = ReturnPathAnswers()
    answers.open(ours, machine)
    return answers, ours, source


def test_a_source_gone_before_shut_0_is_warned_of_and_the_files_stand(caplog):
    """confirm() comes after the files are committed: a source that can no longer
    be told leaves them complete, with a warning that says so, not an error."""
    answers, ours, source = opened_answers()
    try:
        assert source.recv(64) == SWITCHOVER_ACK
        source.close()
        with caplog.at_level(logging.WARNING, logger="fastmfd"):
            answers.confirm()
            answers.confirm()                   # SHUT is tried once
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "answering on its return path failed" in warnings[0]
        assert "the files are complete, but the source QEMU was not told" in warnings[0]
    finally:
        ours.close()


def test_a_failed_migration_says_shut_1_once_and_not_after_confirm():
    answers, ours, source = opened_answers("pc-i440fx-7.2")     # no ack for 7.2's type
    try:
        answers.refuse()
        answers.refuse()
        answers.confirm()
        ours.shutdown(socket.SHUT_WR)
        assert source.recv(64) == encode_rp_shut(failed=True)
        assert source.recv(64) == b""
    finally:
        ours.close()
        source.close()


def test_a_source_that_reads_nothing_of_its_return_path_fails_the_migration():
    """The answers are sent without waiting: a source whose socket buffer is full
    fails at once; it never holds the receive up."""
    answers, ours, source = opened_answers()
    try:
        ours.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:                         # fill what the source never reads
                ours.send(bytes(1 << 16))
        ours.setblocking(True)
        with pytest.raises(MigrationError, match="reads nothing of its return path"):
            answers.pong(1)
        answers.refuse()                        # failing already: no second error
    finally:
        ours.close()
        source.close()
