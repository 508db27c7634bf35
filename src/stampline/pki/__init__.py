"""PKI: tokens (PKCS#11), the CA ceremony, the device certificate profile and CSR policy.

Knows nothing of devices or wires: it takes CSRs and gives certificates.
"""
