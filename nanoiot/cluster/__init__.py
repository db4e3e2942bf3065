"""Several NanoIoT processes sharing one PostgreSQL database."""
