"""The cloud side: a local IoT endpoint with Just-In-Time Registration (Mosquitto + a
registration service), the AWS IoT Core adapter, bulk manifests.

It reads what the station produces (CA certificates, ledger exports, CRLs) and never writes to
the station's ledger.
"""
