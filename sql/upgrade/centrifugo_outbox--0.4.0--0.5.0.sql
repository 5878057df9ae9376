-- centrifugo_outbox 0.4.0 → 0.5.0: no change to SQL objects. 0.5.0 adds the gRPC transport
-- (`centrifugo.api_url = 'grpc://host:port'`) and sends in each round only the rows its snapshot
-- sees (one writer's transactions keep their order); both live in the library.
SELECT 1 WHERE false;
