"""The agent's exception tree, in one place: every deliberate error is defined here.

    AgentError
    ├── ConfigError            configuration file, --set override, a file it names
    │   └── DbcError           a CAN database that is missing or does not parse
    ├── LogFormatError         a CAN log file that is missing or does not parse
    ├── BusError               a CAN bus or serial device could not be opened, read, written
    ├── SigningError           a key missing, unreadable, too widely readable, malformed
    ├── VerificationError      a COSE message failed verification (.reason: §7 reason)
    ├── ParamError             a command's parameters are invalid (BAD_PARAMS; .detail)
    ├── StorageError           the outbox or another durable store could not be used
    ├── UplinkError            the MQTT connection could not be configured or established
    ├── ControlError           the running agent's control socket cannot be reached or refused
    ├── ParseError (ValueError) a device line with the wrong format
    │   ├── NmeaError          an NMEA sentence (.reason: checksum, format, unsupported)
    │   └── AtParseError       an AT information line
    ├── ExprError (ValueError) a condition that does not parse or is over a limit (.pos)
    ├── UpdateError            an update step failed (.reason: §7 reason, .detail)
    │   ├── TargetRefused      this vehicle refuses the target: REJECTED
    │   ├── IllegalTransition  an event the update state machine does not allow now
    │   ├── SlotError          installing into / switching / confirming a slot failed
    │   └── FetchError         downloading or verifying a TUF target failed
    └── RepoError              the tcu-cloud test repository cannot be used

Exceptions that only carry control flow inside one module (a device that stopped answering, a
corrupt SQLite file about to be moved aside, an unknown condition input) stay private there.

Messages say what was wrong, where, and what to do; the CLI prints them as one line and
exits 2.
"""


class AgentError(Exception):
    """Root of every deliberate agent error."""


class ConfigError(AgentError):
    """The configuration file, an override or a file it names is invalid."""


class DbcError(ConfigError):
    """A CAN database (DBC/KCD/ARXML/SYM) file is missing or does not parse."""


class LogFormatError(AgentError):
    """A CAN log file is missing or does not parse."""


class BusError(AgentError):
    """A CAN bus or serial device (modem, GNSS) could not be opened, read or written."""


class ControlError(AgentError):
    """The running agent's local control socket cannot be reached, refused us or failed."""


class SigningError(AgentError):
    """A key is missing, unreadable, too widely readable or malformed."""


class VerificationError(AgentError):
    """A COSE message failed verification; `reason` holds the protocol reason code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ParamError(AgentError):
    """A verified command's parameters fail its family's checks: REJECTED BAD_PARAMS."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class StorageError(AgentError):
    """The outbox or another durable store could not be used."""


class UplinkError(AgentError):
    """The MQTT connection could not be configured or established."""


class ParseError(AgentError, ValueError):
    """A line from a device (NMEA sentence, AT answer) does not have the expected format.

    Also a ValueError: a parser's caller may treat it as bad input like any other."""


class NmeaError(ParseError):
    """A line is not a valid NMEA sentence we use. `reason`: checksum, format or unsupported."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class AtParseError(ParseError):
    """An information line does not have the format TS 27.007 gives for that command."""


class UpdateError(AgentError):
    """An update step failed; `reason` is the §7 reason code to report, `detail` the why.

    Subclasses say where it failed; the reason is what the cloud sees.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class TargetRefused(UpdateError):
    """This vehicle refuses the target (hardware id, version): the command is REJECTED."""


class IllegalTransition(UpdateError):
    """An event that the update state machine does not allow in its current state."""

    def __init__(self, reason: str, state: str, event: str):
        super().__init__(reason, f"update: {event!r} is not allowed while {state}")
        self.state = state
        self.event = event


class SlotError(UpdateError):
    """A slot operation failed; reason INSTALL_FAILED. The active slot is unchanged unless the
    message says otherwise."""

    def __init__(self, detail: str):
        super().__init__("INSTALL_FAILED", detail)


class FetchError(UpdateError):
    """Fetching a target failed; `reason` is DOWNLOAD_FAILED or VERIFICATION_FAILED."""


class RepoError(AgentError):
    """The test repository directory (tcu-cloud repo) is missing, incomplete or cannot be
    written."""


class ExprError(AgentError, ValueError):
    """A condition (PROTOCOL.md §8 language) that does not parse or is over a limit; `pos` is
    the 1-based character position, `message` the text without it."""

    def __init__(self, message: str, pos: int):
        super().__init__(f"{message} at position {pos}")
        self.message = message
        self.pos = pos
