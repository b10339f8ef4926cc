"""The language: .block text -> IR -> Plan. Never imports torch."""
