"""The agent's exception tree, documented in one place.

Every error the agent raises on purpose derives from AgentError. Messages say what
was wrong, where, and what to do; the CLI prints them as one line and exits 2.
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


class SigningError(AgentError):
    """A key is missing, unreadable, too widely readable or malformed."""


class VerificationError(AgentError):
    """A COSE message failed verification; `reason` holds the protocol reason code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class StorageError(AgentError):
    """The outbox or another durable store could not be used."""


class UplinkError(AgentError):
    """The MQTT connection could not be configured or established."""
