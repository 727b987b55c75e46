"""The cache service: the only component that talks to Redis. It keeps serialized results under
the gateway's cache keys, each with a time to live (`fmserve.v1.Cache`: Lookup, Store), and job
records with their items' results (CreateJob, SealJob, GetJob, RecordItems, GetJobResults,
FinishJob, ListJobs)."""
