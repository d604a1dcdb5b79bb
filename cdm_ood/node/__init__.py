"""The DICOM node (`cdm-ood listen`): a storage SCP that spools what it receives (`spool`, `receive`), gates each
series once it has gone quiet with the rules of `cdm-ood score`, and forwards passed series or holds the others
(`node`, `forward`)."""
