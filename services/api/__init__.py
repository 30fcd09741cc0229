"""The api service: owns PostgreSQL and serves the automation.v1 gRPC services."""
