"""tcu-agent: the telematics agent that reads CAN, signs telemetry and runs remote commands."""

__version__ = "0.1.0"
