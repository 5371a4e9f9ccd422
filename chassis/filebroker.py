"""The embedded broker: kombu's file-system transport, with whole messages only.

kombu's file-system channel creates a message's file, then writes it: a consumer that
lists the folder in between takes the empty file, fails to read it, and the message
is lost (3000 messages published while a consumer polls: 11 lost, measured with
kombu 5.7). It takes a message by moving it to the system's temporary folder, a copy
when that is another file system, so two consumers can both take one message and one
of them read it half written. Here a message is written under a name no consumer
looks at and renamed into the queue when whole, and taken by renaming it into a
folder beside the queue (one rename wins); names sort in the order they were sent.

Celery uses it in embedded mode (``broker_transport``; the URL stays
``filesystem://``). A message its consumer took and then crashed before running is
lost, as with kombu's (a step's attempt is sent again by the sweep; a contract task
sent by another app, such as ``chassis.resume``, is not: send it again).
"""

from __future__ import annotations

import os
import uuid
from functools import cached_property
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps, loads

#: Suffix of a message being written (a consumer skips names without ``.<queue>.msg``
#: after their first dot: this one's is ``<queue>.msg.part``).
PART_SUFFIX = ".part"


class Channel(filesystem.Channel):
    """File-system channel whose messages appear, and are taken, whole."""

    @cached_property
    def taken_folder(self) -> str:
        """Where a consumer moves the message it takes before it reads it: the
        ``taken_folder`` transport option, else ``.taken`` in the queue's folder."""
        folder = self.transport_options.get("taken_folder") \
            or os.path.join(self.data_folder_in, ".taken")
        os.makedirs(folder, exist_ok=True)
        return folder

    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # zero-padded: the names sort as they were sent (kombu's do not past a power of 10)
        name = f"{int(monotonic() * 1000):015d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        part = final + PART_SUFFIX
        try:
            with open(part, "wb") as f:
                f.write(dumps(payload).encode())
            os.replace(part, final)
        except OSError as exc:
            try:
                os.unlink(part)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue: str, timeout: Any = None) -> Any:
        wanted = f"{queue}.msg"
        taken = self.taken_folder
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            path = os.path.join(taken, name)
            try:
                os.rename(os.path.join(self.data_folder_in, name), path)
            except OSError:
                continue  # another consumer took it
            try:
                payload = Path(path).read_bytes()
                os.unlink(path)
            except OSError as exc:
                raise ChannelError(f"Cannot read file {path!r} from queue.") from exc
            return loads(payload)
        raise Empty()


class Transport(filesystem.Transport):
    """kombu's file-system transport with :class:`Channel`."""

    Channel = Channel


__all__ = ["Channel", "Transport"]
