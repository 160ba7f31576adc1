/*
 * policies/ — token scorers behind one vtable (DESIGN.md, "Vtables"). The scorers themselves
 * (TriAttention, H2O, StreamingLLM) arrive with the policies work; until then the public calls say so.
 */
#ifndef KVP_POLICY_H
#define KVP_POLICY_H

#include "base/base.h"

#endif /* KVP_POLICY_H */
