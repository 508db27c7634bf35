"""The station/device serial protocol (version 1); the specification is docs/protocol.md.

``wire`` frames bytes, ``messages`` defines the typed messages and their TLV payloads,
``link`` is the station's end and ``server`` the device's (used by the emulator).
"""

from stampline.protocol.link import Link, LinkTimeout
from stampline.protocol.messages import (
    REGISTRY,
    Ack,
    BadPayload,
    Busy,
    CsrBuild,
    CsrBuildReply,
    DeviceError,
    Erase,
    ErrorCode,
    ErrorReply,
    Finish,
    Hello,
    HelloReply,
    Keygen,
    KeygenReply,
    KeyType,
    Message,
    MsgType,
    NvsType,
    Read,
    ReadReply,
    Request,
    StateFlag,
    Status,
    StatusReply,
    Target,
    WriteBegin,
    WriteChunk,
    WriteEnd,
    WriteReply,
)
from stampline.protocol.server import DeviceFault, DeviceServer
from stampline.protocol.wire import (
    MAGIC,
    MAX_PAYLOAD,
    VERSION,
    Frame,
    FrameDecoder,
    FrameError,
    ProtocolError,
    encode_frame,
)

__all__ = [
    "MAGIC", "MAX_PAYLOAD", "REGISTRY", "VERSION", "Ack", "BadPayload", "Busy", "CsrBuild",
    "CsrBuildReply", "DeviceError", "DeviceFault", "DeviceServer", "Erase", "ErrorCode", "ErrorReply",
    "Finish", "Frame", "FrameDecoder", "FrameError", "Hello", "HelloReply", "KeyType", "Keygen",
    "KeygenReply", "Link", "LinkTimeout", "Message", "MsgType", "NvsType", "ProtocolError",
    "Read", "ReadReply", "Request", "StateFlag", "Status", "StatusReply", "Target",
    "WriteBegin", "WriteChunk", "WriteEnd", "WriteReply", "encode_frame",
]
